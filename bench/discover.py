"""Concept discovery benchmarks.

Analysis: `analyze_concepts` over N SAEs × d_sae features × S sentences with P permutations (default
8 × 16384 × 2000, 1000 permutations, the issue's size), run in a fresh subprocess at 1× and 4× the
sentences; prints the wall time and the peak RSS of each (goal: RSS about flat — one SAE file and one
feature chunk in memory at a time, not sentences × features × SAEs).

    python bench/discover.py                       # the issue's size (a few minutes on 2 cores)
    python bench/discover.py --saes 2 --d-sae 4096 --sentences 500

The activation files are synthetic CSR (L0 active features per fragment, exponential values,
`--fragments` prefixes per sentence), written once per size under --workdir and reused.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from saeforge.discover.files import ConceptActivations, activation_file_name, write_activations  # noqa: E402


def write_synthetic(folder: Path, n_sentences: int, n_saes: int, d_sae: int, l0: int, fragments: int,
                    seed: int = 0) -> Path:
    """One CSR activation file per SAE (layer i, l0 `l0`), skipped when it exists."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_rows = n_sentences * fragments
    sentence = np.repeat(np.arange(n_sentences), fragments)
    position = np.tile(np.arange(fragments), n_sentences)
    labels = rng.integers(0, 4, n_sentences)
    texts = np.asarray([f"sentence {i}" for i in range(n_sentences)])
    for layer in range(n_saes):
        path = folder / activation_file_name(layer, l0)
        if path.is_file():
            continue
        indices = np.sort(rng.integers(0, d_sae, (n_rows, l0), dtype=np.int32), axis=1)
        data = rng.exponential(1.0, (n_rows, l0)).astype(np.float32)
        csr = scipy.sparse.csr_matrix((data.ravel(), indices.ravel(), np.arange(0, n_rows * l0 + 1, l0)),
                                      shape=(n_rows, d_sae))
        csr.sum_duplicates()
        write_activations(path, ConceptActivations(
            activations=csr, fragments=texts[sentence], original_sentences=texts[sentence],
            concept_strength_labels=labels[sentence], sentence_indices=sentence, token_positions=position,
            is_final_token=position == fragments - 1, fragment_lengths=position + 1, layer=layer,
            average_l0=float(l0), num_features=d_sae))
    return folder


def run_analysis(folder: Path, out: Path, permutations: int) -> dict[str, float]:
    """Analyse `folder` in this process; wall time and peak RSS (MiB)."""
    from saeforge.config.schema import ConceptAnalysisConfig
    from saeforge.discover.analyze import analyze_concepts

    start = time.perf_counter()
    analyze_concepts(folder, out, ConceptAnalysisConfig(n_permutations=permutations))
    return {"seconds": time.perf_counter() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def analysis_in_subprocess(folder: Path, out: Path, permutations: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", str(folder), str(out), str(permutations)]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_analysis(args: argparse.Namespace) -> None:
    print(f"analysis: {args.saes} SAEs × {args.d_sae} features, {args.permutations} permutations, "
          f"L0 {args.l0}, {args.fragments} fragments per sentence", flush=True)
    results = {}
    for scale in (1, 4):
        n = args.sentences * scale
        folder = write_synthetic(args.workdir / f"acts_{n}", n, args.saes, args.d_sae, args.l0, args.fragments)
        results[scale] = analysis_in_subprocess(folder, args.workdir / f"analysis_{n}", args.permutations)
        print(f"  {scale}× = {n} sentences: {results[scale]['seconds']:.1f} s, "
              f"peak RSS {results[scale]['peak_rss_mib']:.0f} MiB", flush=True)
    print(f"  peak RSS 4×/1×: {results[4]['peak_rss_mib'] / results[1]['peak_rss_mib']:.2f}; "
          f"time 4×/1×: {results[4]['seconds'] / results[1]['seconds']:.2f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(run_analysis(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saes", type=int, default=8)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--l0", type=int, default=64)
    parser.add_argument("--fragments", type=int, default=12)
    parser.add_argument("--workdir", type=Path, default=None, help="where the synthetic files go (default: a temp dir)")
    args = parser.parse_args()
    if args.workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            args.workdir = Path(tmp)
            bench_analysis(args)
    else:
        bench_analysis(args)


if __name__ == "__main__":
    main()
