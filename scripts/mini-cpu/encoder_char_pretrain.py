"""Encoder-only training on the character loss, with the cell recall it reaches (the encoder
stage of docs/training.md §4).

    python scripts/mini-cpu/encoder_char_pretrain.py runs/mini-cpu-char/latest --lr 1e-3 --steps 700

Trains SAM, CLIP, the projector, the final norm and lm_head (the decoder layers and embeddings are
left alone; ``--freeze-head`` keeps the norm and lm_head too) with AdamW at a constant rate on
``dsocr.train.loop.char_loss`` only, on Tiny pages of one sans font. Every ``--every`` steps it prints the loss and the top-k recall of each cell's
characters on 8 held-out pages (k = the cell's character count), and with ``--save`` writes the
whole model there (official layout, via ``dsocr.weights.save_checkpoint``).
"""

import argparse
import math
import time

import torch

from dsocr.language.tokenizer import Tokenizer
from dsocr.train.data import DataRecipe, make_batch
from dsocr.train.loop import cell_logits, char_loss
from dsocr.weights import load_checkpoint, save_checkpoint

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--steps", type=int, default=700)
ap.add_argument("--batch-size", type=int, default=16)
ap.add_argument("--font-sizes", default="32")
ap.add_argument("--min-chars", type=int, default=100)
ap.add_argument("--max-chars", type=int, default=200)
ap.add_argument("--tokenizer", default="data/mini-cpu-384/tokenizer.json")
ap.add_argument("--fresh", action="store_true", help="re-initialise the encoder first")
ap.add_argument(
    "--freeze-head",
    action="store_true",
    help="keep the final norm and lm_head fixed (only the encoder moves), so a decoder already "
    "trained on this head keeps its text readout",
)
ap.add_argument("--every", type=int, default=50)
ap.add_argument("--save", default=None)
ap.add_argument("--seed", type=int, default=5)
args = ap.parse_args()

torch.set_num_threads(2)
model = load_checkpoint(args.model, dtype=torch.float32)
model.train()
if args.fresh:
    from dsocr.model import build_model

    fresh = build_model(model.config, dtype=torch.float32, seed=1).state_dict()
    sd = model.state_dict()
    for k in sd:
        if not k.startswith(("model.layers", "model.embed", "lm_head", "model.norm")):
            sd[k].copy_(fresh[k])
    print("re-initialised the encoder")
tok = Tokenizer.from_file(args.tokenizer)
r = DataRecipe(
    corpus="data/corpus",
    langs=("en",),
    modes=("tiny",),
    font_sizes=tuple(int(s) for s in args.font_sizes.split(",")),
    fonts=("sans",),
    min_chars=args.min_chars,
    max_chars=args.max_chars,
    scan_prob=0,
    scramble_prob=0.5,
    glyph_targets=True,
)
blank = tok.encode(" ")[0]
params = [
    p
    for n, p in model.named_parameters()
    if not n.startswith(("model.layers", "model.embed")) and p.requires_grad
    if not (args.freeze_head and n.startswith(("lm_head", "model.norm")))
]
opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
held = make_batch(r, tok, model.config, step=999, rank=0, batch_size=8, seed=3, split="heldout")


def recall():
    with torch.no_grad():
        t = math.isqrt(held.cell_targets.shape[1])
        P = cell_logits(model, model.encode_images(held.images), t)
    tot = hit = 0
    for p, y in zip(P.flatten(0, 1), held.cell_targets.flatten(0, 1)):
        k = int(y.sum())
        if k:
            tot += k
            hit += int(y[p.topk(k).indices].sum())
    return round(hit / tot, 3)


print("before", recall(), flush=True)
t0 = time.time()
for s in range(args.steps):
    b = make_batch(r, tok, model.config, step=s, rank=0, batch_size=args.batch_size, seed=args.seed)
    e = model.encode_images(b.images)
    loss = char_loss(model, e, b.cell_targets, blank)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if (s + 1) % args.every == 0 or s + 1 == args.steps:
        print(s + 1, round(float(loss.detach()), 3), recall(), round(time.time() - t0), flush=True)
        if args.save:
            save_checkpoint(model, args.save)
