"""The tiny-model builder lives in scripts/tiny_models.py (the headless runner uses it too); the tests import it
as `tiny`."""
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "scripts"))

from tiny_models import *  # noqa: E402,F401,F403
from tiny_models import T5_WIDTH, dit_config  # noqa: E402,F401
