"""The contract: what every other part of the project agrees on.

It sits at the bottom of the project's layers and imports nothing else of it
(``pyproject.toml``'s import-linter contracts check this); it needs no Beam:

``columns``     every column of the slice table, declared once
``schema``      the Arrow schemas of the three output tables, statuses, stages
``layout``      the input layout: link.csv, ids, file names, inter-stage records
``splits``      train/val/test by a stable hash of patient_id
``metrics``     counter names and what counts as an issue
``errors``      the few domain exceptions
``flags``       the quality flags and when each is raised
``digests``     file digests recorded in the summary
``packing``     records packed (and compressed) into one shuffle element
``counts``      the progress count files workers keep for the launcher
``pseudonyms``  keyed pseudonyms of ids, UIDs and path names (HMAC-SHA256)
"""
