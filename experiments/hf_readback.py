"""Reads exported HF folders back through transformers: a fill-mask from the encoder, a generation from the decoder.

    python experiments/hf_readback.py runs/demo/hf     # the folder `ettin export` wrote (encoder/ and decoder/)
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline  # noqa: E402

FILL = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in [MASK] of a wife."
PROMPT = "def read_file(path):\n    with open(path) as f:\n"


def main(root):
    enc = os.path.join(root, "encoder")
    tok = AutoTokenizer.from_pretrained(enc)
    fill = pipeline("fill-mask", model=AutoModelForMaskedLM.from_pretrained(enc), tokenizer=tok)
    print(f"transformers fill-mask ({enc}):\n  {FILL}")
    for r in fill(FILL.replace("[MASK]", tok.mask_token), top_k=5):
        print(f"  {r['score']:.3f}  {r['token_str']!r}")
    dec = os.path.join(root, "decoder")
    # The exported tokenizer starts the prompt with [CLS] and adds no [SEP]; generation_config.json makes it greedy.
    generate = pipeline("text-generation", model=dec)
    text = generate(PROMPT, max_new_tokens=40, return_full_text=False)[0]["generated_text"]
    print(f"transformers greedy generate ({dec}):")
    print(text.replace("\n", "\n  | ").join(["  | " + PROMPT.replace("\n", "\n  | "), ""]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/hf")
