"""The main job, shipped with the library: transfer learning on digits with partial backprop, run by Hydra.

``pip install "lit-partial[demo]"`` installs two commands:

- ``lit-partial-train`` (:func:`lit_partial.app.train.main`): pretrain a CNN on digits 0-4, fine-tune it on 5-9
  with the techniques of ``partial=...``, e.g. ``lit-partial-train partial=freeze_backbone``; ``--help`` lists
  the config groups, ``--cfg job`` prints the composed config.
- ``lit-partial-compare <sweep folder>`` (:func:`lit_partial.app.compare.main`): the accuracy-vs-cost report of a
  multirun (``lit-partial-train -m partial=a,b`` writes it on its own).

The config tree is package data, ``lit_partial/app/conf/`` (:data:`lit_partial.app.config.CONF_DIR`):
``train.yaml`` and the groups ``model``, ``data``, ``trainer``, ``logger``, ``callbacks``, ``partial`` (one
technique preset per file), ``experiment`` (a preset with the settings it needs) and ``debug``.
"""
