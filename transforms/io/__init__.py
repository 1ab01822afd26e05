"""Input and output under the stages. ``stores`` gives the store of a path
(a local disk, ``s3``, ``gcs``: each a ``protocol.Store``) and the helpers
that work on any; ``prefetch`` reads ahead; ``files`` reads input files
safely; ``direct`` writes shards around the page cache; ``dicomweb`` and
``multipart`` talk to a PACS over ``http``'s pool. Nothing here knows the
stages or the data's layout beyond paths and bytes.
"""
