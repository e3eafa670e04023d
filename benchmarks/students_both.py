"""Setting `both` of the headline study: an inherited MiniLM text tower with the >= 4x image student.

    python benchmarks/students_both.py --seeds 0 1 2 [--layers 3]

The text tower keeps every k-th of MiniLM-L6's layers (TinyCLIP's manual inheritance,
`clipdistill.models.composed_inherit`) with the teacher's embeddings and text head, and trains on
Flickr8k train captions: the CLIP loss against the teacher's image embeddings of their images + FD
against the teacher's text embeddings. It is then paired with the image student `lite0-128` of the
same seed (benchmarks/students.py) and both towers are the student's own. Speed: batch-1 latency of
the text tower on a 32-token caption against MiniLM-L6's, same process, PyTorch and ONNX Runtime.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import torch
from students import CELLS, EVAL, WORK, _dataset, _write, class_embeddings, collected, teacher

IMAGE_STUDENT = "lite0-128"
RECIPE = {"clip": 1.0, "fd": 2000.0}


def captions(name: str, split: str, every: int) -> list[str]:
    """Every caption of a split, image by image (the order `collect` stores teacher text embeddings in)."""
    from clipdistill.data.shards import dataset_info, iter_samples, subsample

    path = WORK / "cache" / f"captions-{name}-{split}-{every}.json"
    if path.exists():
        return json.loads(path.read_text())
    caps = [c for s in subsample(iter_samples(dataset_info(name).shards(split)), every) for c in s.captions]
    path.write_text(json.dumps(caps))
    return caps


def train_text(
    student, ids: torch.Tensor, acts, *, epochs: float, seed: int, batch: int = 256, lr: float = 1e-4
) -> dict:
    from clipdistill.losses.base import Outputs
    from clipdistill.losses.config import parse_loss_config
    from clipdistill.losses.distiller import Distiller

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dim = acts.teacher_image.shape[-1]
    distiller = Distiller(parse_loss_config(RECIPE), dim, dim)
    params = [p for p in student.text.parameters() if p.requires_grad] + [student.raw_logit_scale()]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    n = acts.teacher_image.shape[1]
    counts = torch.bincount(acts.text_owner, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    total = int(epochs * n / batch)
    scale_t = teacher().logit_scale().detach()
    student.text.train()
    start = time.time()
    for step in range(total):
        for g in optim.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        idx = torch.randperm(n, generator=gen)[:batch]
        rows = starts[idx] + (torch.rand(len(idx), generator=gen) * counts[idx]).long()
        t_img, t_txt = acts.teacher_image[0, idx], acts.text[rows]
        s_txt = student.text_features(ids[rows]).embedding
        scale = student.logit_scale()
        loss, _ = distiller(
            Outputs(image=t_img, text=s_txt, scale=scale), Outputs(image=t_img, text=t_txt, scale=scale_t)
        )
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
    student.text.eval()
    return {"steps": total, "seconds": round(time.time() - start, 1), "final_loss": float(loss)}


def text_latency(layers: int, threads: int = 2) -> dict:
    from clipdistill.models.composed_inherit import ComposedStudent, text_latency_ms

    torch.set_num_threads(threads)
    t = teacher()
    ids = t.tokenize(
        [
            "a man in a red shirt is climbing a rock wall while his friend holds the rope below him ."
            " a child in a blue jacket watches them from the grass nearby"
        ]
    )[:, :32]
    assert (ids != t.text_tower.tokenizer.pad_token_id).sum() == 32  # a full 32-token caption
    student = ComposedStudent(t, text_layers=layers).eval()
    rounds = {"teacher": [], "student": []}
    for _ in range(3):
        rounds["teacher"].append(text_latency_ms(lambda x: t.text_head(t.text_tower(x)[0]), ids))
        rounds["student"].append(text_latency_ms(student.text, ids))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    return {
        "layers": layers,
        "tokens": 32,
        "threads": threads,
        "torch_ms_b1": med,
        "all_ms": rounds,
        "speedup_torch": med["teacher"] / med["student"],
    }


def run(layers: int, seed: int, epochs: float) -> dict:
    from students import Student, deeper, selected_freeze, student_model

    from clipdistill.eval.retrieval import retrieval_metrics
    from clipdistill.eval.zeroshot import class_embeddings as student_class_embeddings
    from clipdistill.eval.zeroshot import classification_metrics, zeroshot_logits
    from clipdistill.models.composed_inherit import ComposedStudent
    from clipdistill.models.freeze import split_image_tower
    from clipdistill.train.prefix import embed

    out = CELLS / "both" / f"text{layers}-s{seed}.json"
    if out.exists():
        return json.loads(out.read_text())
    t = teacher()
    key = ("pretrained", 128)
    train_acts = collected("train", "flickr8k", "train", 1, True, True)[key]
    ids = t.tokenize(captions("flickr8k", "train", 1))
    student = ComposedStudent(t, text_layers=layers)
    log = train_text(student, ids, train_acts, epochs=epochs, seed=seed)
    freeze = selected_freeze()
    st = Student(IMAGE_STUDENT, "pretrained", 128, freeze)
    model = student_model("pretrained", 128, seed)
    _, suffix = split_image_tower(model, freeze)
    suffix.load_state_dict(torch.load(WORK / "weights" / f"{st.name}-f{freeze}-s{seed}.pt"))
    result = {
        "text_layers": layers,
        "seed": seed,
        "image_student": f"{st.name}-f{freeze}-s{seed}",
        "train": log,
        "epochs": epochs,
        "metrics": {},
    }
    with torch.no_grad():
        for name, (split, every) in EVAL.items():
            acts = deeper(
                collected("eval", name, split, every, name in ("flickr8k", "dev"), False)[key], model, freeze
            )
            image = embed(suffix, acts.prefix[0])
            if acts.text is not None:
                text = torch.cat(
                    [
                        student.text_features(c).embedding
                        for c in t.tokenize(captions(_dataset(name), split, every)).split(256)
                    ]
                )
                m = retrieval_metrics(image, text, acts.text_owner)
                m["ret_mean"] = statistics.fmean(m.values())
            else:
                from clipdistill.data.shards import dataset_info

                info = dataset_info(_dataset(name))
                classes = student_class_embeddings(student, info.classnames, info.templates)
                m = classification_metrics(zeroshot_logits(image, classes), acts.labels)
                m["teacher_text_acc1"] = classification_metrics(
                    zeroshot_logits(image, class_embeddings(_dataset(name))), acts.labels
                )["acc1"]
            result["metrics"][name] = m
    _write(out, result)
    return result


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    parser.add_argument("--layers", type=int, nargs="*", default=[3])
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--latency", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.latency:
        lat = {str(n): text_latency(n) for n in args.layers}
        (CELLS / "both").mkdir(parents=True, exist_ok=True)
        (CELLS / "both" / "latency.json").write_text(json.dumps(lat, indent=2))
        print(json.dumps({k: round(v["speedup_torch"], 2) for k, v in lat.items()}))
    for layers in args.layers:
        for seed in args.seeds:
            r = run(layers, seed, args.epochs)
            print(
                layers,
                seed,
                {k: round(v.get("acc1", v.get("ret_mean", 0)), 4) for k, v in r["metrics"].items()},
            )


if __name__ == "__main__":
    main()
