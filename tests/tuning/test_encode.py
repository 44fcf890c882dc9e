"""What the trainer learns from each kind of sample (run under the ML venv, like the worker)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bastion.local.launcher import engine_python
from bastion.tuning.jobs import WORKER

SNIPPET = """
import json, sys
sys.path.insert(0, sys.argv[1])
from worker import _encode
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[2])
chat = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Who owns Zephyrine?"},
                     {"role": "assistant", "content": "Marta Kowalczyk."}]}
ids, labels, cut = _encode(tok, chat, 512)
full = tok.apply_chat_template(chat["messages"], tokenize=False)
learnt = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
pc = _encode(tok, {"prompt": "Zephyrine runs in", "completion": " Quillon."}, 512)
short = _encode(tok, {"text": "ledger " * 50}, 8)
print(json.dumps({"same": tok.decode(ids) == full, "learnt": learnt,
                  "pc": tok.decode([t for t, lab in zip(pc[0], pc[1]) if lab != -100]),
                  "short": [len(short[0]), short[2]]}))
"""


def test_only_answers_are_learnt(tiny_model: Path) -> None:
    r = subprocess.run(
        [str(engine_python()), "-c", SNIPPET, str(WORKER.parent), str(tiny_model)],
        capture_output=True, text=True, check=True, env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["same"] is True  # turn by turn, the template's rendering exactly
    assert out["learnt"] == "Marta Kowalczyk.<|im_end|>\n"  # not the header the engine writes
    assert out["pc"] == " Quillon.<|im_end|>"  # the completion and EOS, not the prompt
    assert out["short"] == [8, True]  # truncated to max_tokens, and counted
