"""An adapter's lineage, read from the card that `bastion tune run` writes beside its weights
(`bastion-card.json`): the base it was trained on, the data, the hyperparameters, the training
summary and, once `bastion tune validate` ran, the validation result.

Registering an adapter against a base checks the card's base digest against that base's
registry record: an adapter trained on other weights than the base it is registered on would
load, and answer, but not as validated. (Both digests are the same `sha256  path` manifest.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bastion.core.errors import Conflict, InvalidRequest

CARD = "bastion-card.json"
#: What the registry keeps of the training summary (curves stay in the card, whose digest
#: the record holds like any other file's).
TRAINING = ("device", "steps", "epochs", "samples_train", "samples_validation", "seconds",
            "peak_rss_bytes", "peak_cuda_bytes", "base_val_loss", "final_val_loss")  # fmt: skip


def from_card(path: Path, base: dict[str, Any]) -> dict[str, Any]:
    """The lineage of the adapter at `path` from its card ({} without one); 409 if it was
    trained on another base than the record `base`."""
    card_path = path / CARD
    if not card_path.is_file():
        return {}
    try:
        card = json.loads(card_path.read_text())
        trained_on = card["base"]["digest"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest(
            f"{card_path} is not a readable adapter card ({exc}).", code="invalid_card"
        ) from None
    if trained_on != base["manifest_sha256"]:
        raise Conflict(
            f"The adapter at {path} was trained on a base with manifest digest {trained_on}, "
            f"not on {base['ref']} ({base['manifest_sha256']}).",
            code="base_mismatch",
        )
    training = card.get("training") or {}
    validation = card.get("validation")
    return {
        "card": CARD,
        "base_sha256": trained_on,
        "training_data_sha256": (card.get("data") or {}).get("digest"),
        "hyperparameters": card.get("hyperparameters"),
        "training": {k: training.get(k) for k in TRAINING if k in training},
        "validation": None
        if not isinstance(validation, dict)
        else {k: validation.get(k) for k in ("at", "passed", "heldout", "engine")},
    }
