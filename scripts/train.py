"""The main job from a checkout: ``python scripts/train.py partial=freeze_backbone`` = ``lit-partial-train ...``.

A thin shim over :func:`lit_partial.app.train.main` (``make train`` installs the checkout in editable mode, so
``lit_partial`` imports from here); every command of the README runs the same either way.
"""

from lit_partial.app.train import main

if __name__ == "__main__":
    main()
