"""Where the data comes from: a ``Source`` is a PTransform with the same
tagged outputs whatever it reads (``source``). ``tree.TreeSource`` reads a
data tree, ``pacs.PacsSource`` a PACS with the tree's contours; both are made
of ``listing`` (link.csv and the tree's files) and, for a PACS, ``pacs``'s
search.
"""
