r"""Copy of pretraining shards with the labels of the train split shuffled across records.

  python bench/shuffled_labels.py --shards SHARDS_DIR --out OUT_DIR [--seed 0]

The control trunk of the few-shot study (bench/fewshot.py, variant
``control``) is pretrained on these: same volumes, same label marginals
and co-occurrences, same schedule, but the label of a volume is another
volume's, so what the trunk learns cannot come from the metadata labels.
Each train record keeps its volume and takes ``targets``, ``coverage``,
``labels`` and ``provenance`` from the record at a seeded permutation;
val and test keep their true labels (so the control's val accuracy shows
that it learned nothing transferable about them). Prints the share of train
records whose sequence / plane target changed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from radnet_jax.cli import flags  # noqa: E402  pylint: disable=wrong-import-position

LABEL_KEYS = ("targets", "coverage", "labels", "provenance")


def shuffle_shards(src: str, dst: str, seed: int = 0) -> dict:
  """Writes ``dst`` (shards + manifest) from ``src`` with shuffled train labels -> stats."""
  from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  from radnet_jax.shards import records  # pylint: disable=g-import-not-at-top
  with open(os.path.join(src, "manifest.json")) as f:
    manifest = json.load(f)
  tmp = dst + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.array_record"))
  stats = {}
  for split, shards in manifest["shards"].items():
    paths = [os.path.join(src, s["file"]) for s in shards]
    recs, counts = [], []
    for path in paths:
      reader = ArrayRecordReader(path)
      n = reader.num_records()
      recs += [reader.read([i])[0] for i in range(n)]
      counts.append(n)
      reader.close()
    out = recs
    if split == "train":
      dec = [records.decode(r) for r in recs]
      perm = np.random.default_rng(seed).permutation(len(dec))
      out = []
      for i, d in enumerate(dec):
        src_rec = dec[perm[i]]
        new = {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in d.items()}
        for k in LABEL_KEYS:
          if k in src_rec:
            new[k] = np.array(src_rec[k]) if isinstance(src_rec[k], np.ndarray) else src_rec[k]
        out.append(records.encode(new))
      changed = {t: float(np.mean([dec[i].get("targets", {}).get(t) != dec[perm[i]].get("targets", {}).get(t)
                                   for i in range(len(dec))])) for t in ("sequence", "plane", "contrast")}
      stats = {"train_records": len(dec), "changed": changed}
    pos = 0
    for path, n in zip(paths, counts):
      w = ArrayRecordWriter(os.path.join(tmp, os.path.basename(path)), "group_size:1")
      for r in out[pos:pos + n]:
        w.write(r)
      w.close()
      pos += n
  with open(os.path.join(tmp, "SHUFFLED_LABELS.json"), "w") as f:
    json.dump({"source": os.path.basename(os.path.normpath(src)), "seed": seed, **stats}, f, indent=1)
  shutil.rmtree(dst, ignore_errors=True)
  os.replace(tmp, dst)
  return stats


def main():
  p = flags.Parser(description=__doc__, formatter_class=flags.RawDescriptionHelpFormatter)
  p.add_argument("--shards", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  stats = shuffle_shards(a.shards, a.out, a.seed)
  print(f"{stats['train_records']} train records; labels changed: "
        + ", ".join(f"{k} {v:.0%}" for k, v in stats["changed"].items()))


if __name__ == "__main__":
  main()
