"""The paper-claims suite (``deploy-prune bench suite``): the papers' operating points, measured.

``config`` (the suite YAML), ``models`` (base and slim model directories per operating point),
``suite`` (plan, cache and time the units), ``report`` (the results page, CSV and plot) and
``readme`` (the README's tables generated from the committed CSV).
"""
