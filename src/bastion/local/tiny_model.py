"""Generate Bastion's tiny, deterministic Llama-architecture chat model.

Run it with the *engine* virtualenv's python (it needs torch, transformers and tokenizers,
which the gateway never imports)::

    ~/.cache/bastion/vllm-venv/bin/python src/bastion/engines/tiny_model.py OUT_DIR

Nothing is downloaded: the byte-level BPE tokenizer is trained on a corpus generated here
from a fixed word list and a portable PRNG, and the weights are random numbers drawn after
``torch.manual_seed(0)``.  The same generator version, seed and library versions give
byte-identical files, hence identical hashes (recorded in ``bastion-model.json``).

The model produces random text.  It exists so that tests and the quickstart exercise a
real inference engine end to end, not to be smart.

The output directory appears atomically: files are written into a private temporary
sibling directory that is renamed to OUT_DIR at the end.  If another process wins the race
and OUT_DIR already holds a valid model, this process throws its copy away and succeeds.

Only the standard library is imported at module level, so the gateway may import
``GENERATOR_VERSION`` from this module without pulling torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

#: Bump whenever the generated files change (corpus, tokenizer, config, weights, layout).
GENERATOR_VERSION = 2  # 2: a 65,536-position window

STAMP_FILE = "bastion-model.json"
SEED = 0
VOCAB_SIZE = 4096

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)  # ids 0, 1, 2

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,  # the vLLM CPU attention backend needs head_dim >= 64
    # Coding assistants send ~20k-token system prompts and tools: a long window, cheap to fill
    # on a model this small.
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
INIT_STD = 0.02

# --------------------------------------------------------------------------------------
# Deterministic corpus (no dependency on Python's `random` or on any file on disk)
# --------------------------------------------------------------------------------------

_WORDS_TEXT = """
the of and to in is it you that he was for on are with as his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left
late run while press close night real life few north open seem together next white children
begin got walk example ease paper group always music those both mark often letter until mile
river car feet care second book carry took science eat room friend began idea fish mountain
stop once base hear horse cut sure watch color face wood main enough plain girl usual young
ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half
rock order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast verb
sing listen six table travel less morning ten simple several vowel toward war lay against
pattern slow center love person money serve appear road map rain rule govern pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star
box noun field rest correct able pound done beauty drive stood contain front teach week final
gave green quick develop ocean warm free minute strong special mind behind clear tail produce
fact street inch multiply nothing course stay wheel full force blue object decide surface deep
moon island foot system busy test record boat common gold possible plane stead dry wonder
laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant
fill east paint language among model engine gateway token request response stream account
budget limit audit policy tenant user admin server client network cluster memory latency
bank payment invoice ledger balance transfer customer report quarter revenue risk compliance
"""
_WORDS = tuple(_WORDS_TEXT.split())

_SYLLABLES_TEXT = """
ba be bi bo bu ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu ra re ri ro ru
sa se si so su ta te ti to tu va ve vi vo vu za ze zi zo zu cha che chi sho shu tra tre
tri pro pre pla ple gra gre fla fle ster ing tion ment ness able ous ful less ly er est
"""
_SYLLABLES = tuple(_SYLLABLES_TEXT.split())

_PUNCT = (".", ".", ".", "?", "!", ",", ";", ":")

_CHAT_LINES = (
    "Hello! How can I help you today?",
    "Sure, here is a short answer.",
    "I am not sure about that, but here is what I know.",
    "Thank you for your question.",
    "Please tell me more about the problem.",
    "The answer is 42.",
    "What is the capital of France? The capital of France is Paris.",
    "Summarize the report in three bullet points.",
    "You are a helpful assistant.",
)


class _SplitMix64:
    """A tiny portable PRNG: identical sequences on every platform and Python version."""

    _MASK = (1 << 64) - 1

    def __init__(self, seed: int) -> None:
        self.state = seed & self._MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self._MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def choice(self, items: tuple[str, ...] | list[str]) -> str:
        return items[self.below(len(items))]


def _pseudo_word(rng: _SplitMix64) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(1 + rng.below(3)))


def _sentence(rng: _SplitMix64) -> str:
    words = []
    for _ in range(4 + rng.below(14)):
        kind = rng.below(20)
        if kind < 13:
            words.append(rng.choice(_WORDS))
        elif kind < 17:
            words.append(_pseudo_word(rng))
        elif kind < 19:
            words.append(str(rng.below(10_000)))
        else:
            words.append(rng.choice(_WORDS).capitalize())
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(_PUNCT)


def corpus(seed: int = SEED, lines: int = 30_000) -> list[str]:
    """The deterministic training corpus for the tokenizer."""
    rng = _SplitMix64(seed + 0x5EED)
    out: list[str] = list(_CHAT_LINES)
    for i in range(lines):
        if i % 50 == 0:
            out.append(f'{{"id": {rng.below(1000)}, "name": "{rng.choice(_WORDS)}", "ok": true}}')
        elif i % 37 == 0:
            out.append(f"def {rng.choice(_WORDS)}_{rng.choice(_WORDS)}(x):\n    return x + 1")
        else:
            out.append(" ".join(_sentence(rng) for _ in range(1 + rng.below(3))))
    return out


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def _train_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))

    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if ids != {PAD_TOKEN: 0, IM_START: 1, IM_END: 2}:
        raise RuntimeError(f"unexpected special token ids: {ids}")

    added_tokens_decoder = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": [IM_START, IM_END],
            "eos_token": IM_END,
            "pad_token": PAD_TOKEN,
        },
    )
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True), **ids}


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def _write_model(out: Path, vocab_size: int, pad_id: int, eos_id: int) -> None:
    import torch
    from safetensors.torch import save_file  # a dependency of transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **MODEL_CONFIG,
    )
    config.architectures = ["LlamaForCausalLM"]

    torch.manual_seed(SEED)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}

    # Fill every tensor ourselves, in sorted name order, from one seeded generator:
    # independent of how a transformers version happens to initialise modules.
    gen = torch.Generator().manual_seed(SEED)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.float32)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float32) * INIT_STD
        tensors[name] = t.to(torch.bfloat16).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    cfg = config.to_dict()
    cfg.pop("transformers_version", None)
    cfg["dtype"] = "bfloat16"
    cfg["torch_dtype"] = "bfloat16"
    _write_json(out / "config.json", cfg)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": pad_id, "eos_token_id": eos_id, "pad_token_id": pad_id},
    )


def _self_check(out: Path, eos_id: int) -> None:
    """Load what was written the way an engine would; fail loudly if anything is off."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    if tok.eos_token_id != eos_id:
        raise RuntimeError(f"tokenizer eos {tok.eos_token_id} != {eos_id}")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], tokenize=False, add_generation_prompt=True
    )
    expected = "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    if prompt != expected:
        raise RuntimeError(f"chat template renders {prompt!r}")
    ids = tok(prompt)["input_ids"]
    if tok.decode(ids) != prompt:
        raise RuntimeError("tokenizer does not round-trip the chat prompt")
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    if not torch.isfinite(logits.float()).all():
        raise RuntimeError("model produces non-finite logits")


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_stamp(model_dir: Path) -> dict[str, Any] | None:
    """The stamp of a generated model dir, or None if it is missing/corrupt/outdated."""
    try:
        stamp = json.loads((model_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("generator_version") != GENERATOR_VERSION:
        return None
    files = stamp.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for name, digest in files.items():
        p = model_dir / name
        if not p.is_file() or _sha256(p) != digest:
            return None
    return stamp


def generate(out_dir: Path, *, verify: bool = True) -> Path:
    """Generate the model into ``out_dir`` atomically; return ``out_dir``."""
    out_dir = out_dir.resolve()
    if read_stamp(out_dir) is not None:
        return out_dir
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists but is not a valid v{GENERATOR_VERSION} model")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tok_info = _train_tokenizer(tmp)
        _write_model(tmp, tok_info["vocab_size"], tok_info[PAD_TOKEN], tok_info[IM_END])
        if verify:
            _self_check(tmp, tok_info[IM_END])
        for p in tmp.iterdir():
            p.chmod(0o644)  # safetensors creates its file 0600; the cache may be shared
        tmp.chmod(0o755)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        import tokenizers
        import torch
        import transformers

        stamp = {
            "generator_version": GENERATOR_VERSION,
            "seed": SEED,
            "vocab_size": tok_info["vocab_size"],
            "eos_token": IM_END,
            "eos_token_id": tok_info[IM_END],
            "pad_token": PAD_TOKEN,
            "pad_token_id": tok_info[PAD_TOKEN],
            "libraries": {
                "tokenizers": tokenizers.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "files": files,
        }
        _write_json(tmp / STAMP_FILE, stamp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Somebody else finished first: keep theirs if it is valid.
            if read_stamp(out_dir) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out_dir", type=Path, help="directory to create (atomically)")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip loading the result with transformers"
    )
    parser.add_argument("--version", action="store_true", help="print GENERATOR_VERSION and exit")
    if argv is None:
        argv = sys.argv[1:]
    if "--version" in argv:
        print(GENERATOR_VERSION)
        return 0
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    print(generate(args.out_dir, verify=not args.no_verify))
    return 0


if __name__ == "__main__":
    sys.exit(main())
