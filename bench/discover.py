"""Concept discovery benchmarks.

Extraction (`--part extract`): N SAEs (N = 1, 2, 4, 8 or `--n-saes`, spread over the layers, the
deepest always the last block) over S sentences of the tiny model (or `--model smollm2`). Per N, side
by side in one run: the baseline = one forward pass over the same batches stopping at the deepest
hookpoint + every SAE's encode of every fragment as extraction encodes (`encode_inference_sparse`
into a reused buffer, activations already in memory, no files), against `extract_concepts` end to
end (fragments, the LM pass into the hookpoint cache, encodes, npz writes; the LM loaded before).
Goals: baseline / extraction >= 0.8, and the LM seconds flat in N (one LM pass whatever N). Each
side runs --repeats times interleaved and the best time of each is compared.

    python bench/discover.py --part extract [--model tiny|smollm2] [--n-saes 4,8] [--repeats 5]

Measured (2 shared CPU cores; ratios move by ±0.1 with the other jobs' load): tiny, --repeats 5,
N = 1, 2, 4, 8: ratio 0.84, 0.80, 0.85, 0.84 (a second run: outlier, 0.84, 0.76, 0.80), LM 0.06-0.08 s
whatever N; SmolLM2, --repeats 2: N = 4 1.69 (LM 13.6 s), N = 8 0.96 (LM 10.4 s). Before the pre-
activation buffer, the writer thread and the one-call fragment decoding: 0.49-0.59 on tiny, against
a weaker baseline (dense encode_inference, which pays a fresh [rows, d_sae] array per batch).

Analysis: `analyze_concepts` over N SAEs × d_sae features × S sentences with P permutations (default
8 × 16384 × 2000, 1000 permutations, the issue's size), run in a fresh subprocess at 1× and 4× the
sentences; prints the wall time and the peak RSS of each (goal: RSS about flat — files are streamed
one group of features at a time; what grows is the label shuffles, P × S bytes, and one P × S float32
matrix while a chunk is tested).

    python bench/discover.py                       # the issue's size (a few minutes on 2 cores)
    python bench/discover.py --saes 2 --d-sae 4096 --sentences 500

Measured on the 2 shared CPU cores of the development machine (load average 3-8 from other jobs):
1× (2,000 sentences) 85 s, peak RSS 325 MiB; 4× (8,000) 295 s, 339 MiB: 1.04× the RSS for 4× the
sentences. Before streaming (same machine, busier): 129 s, 388 MiB; 1024 s, 635 MiB (1.64×).

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


def bench_sentences(n: int) -> list[str]:
    """n deterministic sentences of 6–25 words from the tiny model's training text."""
    from saeforge.lm.tiny import TRAINING_TEXT

    words = TRAINING_TEXT.split()
    rng = np.random.default_rng(0)
    return [" ".join(words[(i * 7) % len(words):][: int(rng.integers(6, 26))] or words[:6]) for i in range(n)]


def bench_extraction(args: argparse.Namespace) -> None:
    import torch

    from saeforge.discover.concepts import ConceptSentences
    from saeforge.discover.extract import build_fragments, extract_concepts
    from saeforge.discover.sae_set import ResolvedSAE
    from saeforge.lm.capture import capture_residual, run_until_captured
    from saeforge.lm.loading import load_lm
    from saeforge.sae.formats import load_sae, write_saelens
    from saeforge.sae.model import SAEConfig, SparseAutoencoder
    from hydra import compose, initialize_config_dir

    torch.manual_seed(0)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        model_cfg = compose(config_name="discover", overrides=[f"model={args.model}", "logger=none"]).model
    lm = load_lm(model_cfg)
    sentences = bench_sentences(args.bench_sentences)
    concepts = ConceptSentences(sentences, [i % 4 for i in range(len(sentences))], "bench", 0)
    frags = build_fragments(lm.tokenizer, concepts, 128)
    print(f"extraction: {args.model} ({lm.n_layers} blocks, d_model {lm.d_model}), {len(sentences)} sentences = "
          f"{frags.n} fragments, SAEs of {args.bench_d_sae} latents (topk 32), batch {args.batch_size}", flush=True)
    print(f"  {'N':>3} {'baseline s':>10} {'extract s':>10} {'ratio':>6} {'LM s':>6} {'LM batches':>10}")
    for n in args.n_saes:
        layers = [lm.n_layers - 1 - (i * lm.n_layers) // n for i in range(n)]  # deepest = last block
        saes = []
        for i, layer in enumerate(layers):
            sae = SparseAutoencoder(SAEConfig(d_in=lm.d_model, d_sae=args.bench_d_sae, k=32, architecture="topk"))
            folder = write_saelens(sae, args.workdir / f"sae_{n}_{i}", hook_name=f"layers.{layer}")
            saes.append(ResolvedSAE(i, f"layer_{layer}_l0_{i}_activations.npz", f"layers.{layer}", layer, str(i), 32.0,
                                    str(folder), str(folder), None, lm.d_model, args.bench_d_sae))
        hookpoints = sorted({s.hookpoint for s in saes})
        loaded = [load_sae(s.local)[0].eval() for s in saes]

        # the encodes as extraction does them (sparse, into a reused buffer) but without any file
        widest = max(sum(len(t) for t in frags.token_ids[b : b + args.batch_size])
                     for b in range(0, len(frags.token_ids), args.batch_size))
        scratches = [torch.empty((widest, args.bench_d_sae)) for _ in saes]

        def run_baseline() -> float:  # one forward to the deepest hookpoint + the encodes
            start = time.perf_counter()
            bos = lm.tokenizer.bos_token_id
            for b in range(0, len(frags.token_ids), args.batch_size):
                batch = frags.token_ids[b : b + args.batch_size]
                width = 1 + max(len(t) for t in batch)
                ids = torch.full((len(batch), width), bos, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, seq in enumerate(batch):
                    ids[j, : 1 + len(seq)] = torch.tensor([bos, *seq])
                    mask[j, : 1 + len(seq)] = 1
                with capture_residual(lm.model, hookpoints) as captured:
                    run_until_captured(lm.model, input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))
                with torch.no_grad():
                    for s, sae, scratch in zip(saes, loaded, scratches):
                        x = torch.cat([captured[s.hookpoint][j, 1 : 1 + len(seq)] for j, seq in enumerate(batch)])
                        sae.to(x.device).encode_inference_sparse(x.float(), scratch[: len(x)])
            return time.perf_counter() - start

        def run_extraction(rep: int):
            start = time.perf_counter()
            stats = extract_concepts(concepts, saes, model_cfg, args.workdir / f"extract_{n}_{rep}",
                                     fingerprint=f"bench-{n}", batch_size=args.batch_size, lm=lm,
                                     **({"encode_rows": args.encode_rows} if args.encode_rows else {}))
            return time.perf_counter() - start, stats

        baselines, walls, lm_seconds = [], [], []
        for rep in range(args.repeats):  # interleaved, best of each: a shared machine's noise hits both alike
            baselines.append(run_baseline())
            wall, stats = run_extraction(rep)
            walls.append(wall)
            lm_seconds.append(stats.lm_seconds)
        baseline, wall = min(baselines), min(walls)
        print(f"  {n:>3} {baseline:>10.2f} {wall:>10.2f} {baseline / wall:>6.2f} {min(lm_seconds):>6.2f} "
              f"{stats.lm_batches:>10}", flush=True)


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
    parser.add_argument("--part", choices=("extract", "analysis", "both"), default="both")
    parser.add_argument("--model", default="tiny", help="extraction: tiny or smollm2")
    parser.add_argument("--bench-sentences", type=int, default=200, help="extraction: sentences")
    parser.add_argument("--bench-d-sae", type=int, default=4096, help="extraction: latents per SAE")
    parser.add_argument("--batch-size", type=int, default=16, help="extraction: sentences per forward")
    parser.add_argument("--repeats", type=int, default=3, help="extraction: runs per N (best of each side)")
    parser.add_argument("--encode-rows", type=int, default=None, help="extraction: discover.encode_rows (default: its default)")
    parser.add_argument("--n-saes", type=lambda text: [int(n) for n in text.split(",")], default=[1, 2, 4, 8],
                        help="extraction: the numbers of SAEs timed, comma-separated (default 1,2,4,8)")
    args = parser.parse_args()

    def run_parts() -> None:
        if args.part in ("extract", "both"):
            bench_extraction(args)
        if args.part in ("analysis", "both"):
            bench_analysis(args)

    if args.workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            args.workdir = Path(tmp)
            run_parts()
    else:
        run_parts()


if __name__ == "__main__":
    main()
