"""The user's commands beside ``run``, Beam-free: ``verify``, ``qa`` (the QA
page), ``overlay`` (one slice with its outlines: ``cardiac-mri inspect``),
``render`` (their drawing), ``problems``, ``sample`` (the test-tree
generator) and ``keys`` (pseudonymisation keys and the id map).
"""
