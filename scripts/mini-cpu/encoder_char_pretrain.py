"""Encoder-only training on the character loss, with the cell recall it reaches (an experiment of
docs/training.md §4, not a training stage of the loop yet).

    python scripts/mini-cpu/encoder_char_pretrain.py runs/mini-cpu-char/latest 1e-3 700

Trains SAM, CLIP, the projector, the final norm and lm_head (the decoder layers and embeddings are
left alone) with AdamW at a constant rate on ``dsocr.train.loop.char_loss`` only, batch 16 of
Tiny pages (DejaVu Sans 32 px, 100-200 characters). Every 50 steps it prints the loss and the
top-k recall of each cell's characters on 8 held-out pages (k = the cell's character count).
Writes nothing. Add ``fresh`` to re-initialise the encoder first.
"""

import sys
import time

import torch

from dsocr.language.tokenizer import Tokenizer
from dsocr.train.data import DataRecipe, make_batch
from dsocr.train.loop import char_loss, global_view_tokens
from dsocr.weights import load_checkpoint

torch.set_num_threads(2)

model = load_checkpoint(sys.argv[1], dtype=torch.float32)
model.train()
lr = float(sys.argv[2])
steps = int(sys.argv[3])
if len(sys.argv) > 4 and sys.argv[4] == "fresh":
    from dsocr.model import build_model

    fresh = build_model(model.config, dtype=torch.float32, seed=1).state_dict()
    sd = model.state_dict()
    for k in sd:
        if not k.startswith(("model.layers", "model.embed", "lm_head", "model.norm")):
            sd[k].copy_(fresh[k])
    print("re-initialised the encoder")
tok = Tokenizer.from_file("data/mini-cpu-384/tokenizer.json")
r = DataRecipe(
    corpus="data/corpus",
    langs=("en",),
    modes=("tiny",),
    font_sizes=(32,),
    fonts=("sans",),
    min_chars=100,
    max_chars=200,
    scan_prob=0,
    scramble_prob=0.5,
    glyph_targets=True,
)
blank = tok.encode(" ")[0]
params = [
    p
    for n, p in model.named_parameters()
    if not n.startswith(("model.layers", "model.embed")) and p.requires_grad
]
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def recall(split="heldout"):
    b = make_batch(r, tok, model.config, step=999, rank=0, batch_size=8, seed=3, split=split)
    with torch.no_grad():
        e = model.encode_images(b.images)
        t = 8
        g = torch.stack([global_view_tokens(x, t) for x in e])
        P = model.lm_head(model.model.norm(g))
    Y = b.cell_targets
    tot = hit = 0
    for p, y in zip(P.flatten(0, 1), Y.flatten(0, 1)):
        k = int(y.sum())
        if k:
            tot += k
            hit += int(y[p.topk(k).indices].sum())
    return round(hit / tot, 3)


print("before", recall())
t0 = time.time()
for s in range(steps):
    b = make_batch(r, tok, model.config, step=s, rank=0, batch_size=16, seed=5)
    e = model.encode_images(b.images)
    loss = char_loss(model, e, b.cell_targets, blank)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if s % 50 == 49:
        print(s + 1, round(float(loss.detach()), 3), recall(), round(time.time() - t0))
