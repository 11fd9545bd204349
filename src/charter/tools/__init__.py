"""Seeing the security model: ``charter check``, the manifest and ``charter report``.

* :mod:`charter.tools.inventory` — every way into a live application (routes,
  CLI commands, webhook events, agent tools), joined with the gate's registry;
* :mod:`charter.tools.check` — findings with stable codes, accepted findings,
  text, JSON and SARIF 2.1.0 output;
* :mod:`charter.tools.manifest` — one canonical file of the whole security model;
* :mod:`charter.tools.report` — one self-contained HTML page for people.
"""
