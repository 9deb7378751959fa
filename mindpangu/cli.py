"""Command-line entry points (console scripts and tools/*.py): argument parsing and a call into the library.

Bad input (config errors, missing files, mismatched weights) is printed as one line on stderr with exit code 2,
never as a traceback (set MINDPANGU_DEBUG=1 to see the traceback as well).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys

from .config import ConfigError


def _friendly(fn):
    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            return fn(argv)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            if os.environ.get("MINDPANGU_DEBUG"):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return wrapper


def _is_override(word: str) -> bool:
    """A ``key.path=value`` override: the part before '=' is a dotted path whose first part is a recipe section or
    top-level key (``model``, ``runner_config``, ``seed``, ...), so a value such as ``--out a=b`` is not one."""
    from .config import TrainConfig

    key, eq, _ = word.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
        return False
    return key.split(".")[0] in {f.name for f in dataclasses.fields(TrainConfig)}


def _parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parse_intermixed_args`` with the overrides taken from wherever they stand, so that one after an option
    with several values (``--rank 0 7 parallel_config.data_parallel=2``) is not read as one of its values."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.dest == "overrides" for a in p._actions):
        return p.parse_args(argv)
    args = p.parse_intermixed_args([w for w in argv if not _is_override(w)])
    args.overrides = list(args.overrides or []) + [w for w in argv if _is_override(w)]
    return args


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML recipe, e.g. yaml_configs/pangu_ultra_moe/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. model.num_layers=2")


@_friendly
def train_main(argv=None):
    """Train a model from a YAML recipe (the main job)."""
    p = argparse.ArgumentParser(prog="mindpangu-train", description=train_main.__doc__)
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--max-steps-this-run", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps; --resume continues (time-limited jobs)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="start even when the memory estimate exceeds this machine's memory")
    args = _parse(p, argv)
    from .config import load_config
    from .train.trainer import Trainer, TrainingStopped

    cfg = load_config(args.config, args.overrides)
    try:
        Trainer(cfg, resume=args.resume or None, progress=not args.no_progress,
                max_steps_this_run=args.max_steps_this_run, memory_check=not args.skip_memory_check).run()
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


@_friendly
def preprocess_main(argv=None):
    """Tokenise text or JSONL files and pack them into a MindRecord dataset of seq_length + 1 tokens per sample."""
    p = argparse.ArgumentParser(prog="mindpangu-preprocess", description=preprocess_main.__doc__)
    p.add_argument("--input", nargs="+", required=True,
                   help="files or glob patterns ('corpus/*.jsonl.gz'): .jsonl/.json (one document per line), any "
                        "other file is plain text (one document); .gz is read compressed")
    p.add_argument("--out", required=True, help="output dataset directory (replaced atomically when complete)")
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--tokenizer", default="byte", help="'byte' or a Hugging Face tokenizer.json")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text")
    p.add_argument("--domain-key", default=None,
                   help="JSONL field holding each document's domain label (plain-text files: the file name); "
                        "adds a per-token domain_ids column for per-domain metrics")
    p.add_argument("--shard-mb", type=float, default=256, help="MiB of samples per MindRecord file (default 256)")
    args = _parse(p, argv)
    from .data.mindrecord import preprocess
    from .data.tokenizer import load_tokenizer

    meta = preprocess(args.input, load_tokenizer(args.tokenizer), args.seq_length, args.out, args.shard_mb,
                      args.text_key, args.domain_key)
    print(f"wrote {args.out}: {meta['num_samples']:,} samples of {args.seq_length + 1} tokens in "
          f"{len(meta['files'])} file(s) ({meta['tokens']:,} tokens, {meta['documents']:,} documents"
          + (f", domains {', '.join(meta['domains'])}" if meta.get("domains") else "") + ")")


@_friendly
def param_count_main(argv=None):
    """Print the per-component parameter table of a recipe (analytic; nothing is allocated)."""
    p = argparse.ArgumentParser(prog="mindpangu-params", description=param_count_main.__doc__)
    _config_args(p)
    p.add_argument("--forward", action="store_true", help="also build the model and run one forward pass")
    args = _parse(p, argv)
    from .config import load_config
    from .params import count_parameters, format_table

    cfg = load_config(args.config, args.overrides)
    print(f"{cfg.model.type}  ({args.config})")
    print(format_table(count_parameters(cfg.model)))
    if args.forward:
        from .bench import forward_once

        forward_once(cfg)


@_friendly
def convert_main(argv=None):
    """Convert between a Hugging Face checkpoint directory and a MindSpore checkpoint."""
    p = argparse.ArgumentParser(prog="mindpangu-convert", description=convert_main.__doc__)
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-ms", help="HF directory (config.json + *.safetensors) -> .ckpt (+ .yaml beside it)")
    a.add_argument("--hf", required=True)
    a.add_argument("--out", required=True)
    b = sub.add_parser("ms-to-hf", help=".ckpt (+ its .yaml) -> HF directory")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--config", default="", help="model YAML; default: the .yaml beside the checkpoint")
    b.add_argument("--out", required=True)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                   help="tensor dtype on disk (default float32)")
    b.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file, e.g. 5GB, 500MB (default 5GB; more shards get an index)")
    args = _parse(p, argv)
    import gc

    from .convert.checkpoint import checkpoint_config, load_ms_checkpoint, save_ms_checkpoint
    from .convert.hf import assign, check_names, check_shape, load_hf_directory, save_hf_directory
    from .models import build_model

    if args.direction == "hf-to-ms":  # streamed into the model, tensor by tensor
        cfg, params = load_hf_directory(args.hf)
        model = build_model(cfg, init=False)
        assign(model, params, args.hf)
        save_ms_checkpoint(model, cfg, args.out)
        print(f"wrote {args.out} ({sum(int(p.size) for p in model.get_parameters()):,} parameters)")
        return
    # ms-to-hf: the model is built only to learn its names and shapes, then written from the checkpoint itself
    cfg = checkpoint_config(args.ckpt, args.config)
    shapes = {p.name: tuple(p.shape) for p in build_model(cfg, init=False).get_parameters()}
    gc.collect()  # the cells hold reference cycles: free the model before the checkpoint is read
    _, params = load_ms_checkpoint(args.ckpt, args.config)
    check_names(shapes, params, args.ckpt)
    for name, value in params.items():
        check_shape(name, value, shapes[name], args.ckpt)
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(args.dtype, args.dtype)
    files = save_hf_directory(params, cfg, args.out, dtype, args.max_shard_size)
    print(f"wrote {args.out} ({sum(v.size for v in params.values()):,} parameters, {dtype}, "
          f"{len(files)} safetensors file(s))")


def _weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default="", help="training output dir, a step_XXXXXXXX dir, or a .ckpt (+ .yaml beside)")
    p.add_argument("--hf", default="", help="Hugging Face checkpoint directory (config.json + *.safetensors)")


def _load_weights(args):
    """(model, config or None) from --config/--ckpt/--hf, in GRAPH mode on CPU."""
    import mindspore as ms

    from .config import load_config
    from .inference import load_model

    ms.set_context(mode=ms.GRAPH_MODE)
    cfg = load_config(args.config, args.overrides) if args.config else None
    return load_model(cfg.model if cfg else None, args.ckpt, args.hf), cfg


@_friendly
def export_main(argv=None):
    """Export a model to MindIR for serving: prefill.mindir (dynamic batch and prompt lengths -> each prompt's
    last logits and the attention caches), decode_b<B>.mindir per batch size (one token per sequence -> logits,
    the caches held inside and updated in place), the MTP speculative graphs (draft_prefill, speculative) when
    the model has MTP layers, manifest.json, and the recipe's tokenizer."""
    p = argparse.ArgumentParser(prog="mindpangu-export", description=export_main.__doc__)
    p.add_argument("--config", default="",
                   help="YAML recipe (checked against the checkpoint's own config; its tokenizer is exported); "
                        "default: the config of --hf's config.json or of --ckpt")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides (with --config)")
    _weights_args(p)
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--max-len", type=int, default=None,
                   help="decode cache length (prompt + generated tokens); default min(512, max_position_embeddings)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16],
                   help="decode graphs to export, one per batch size (static shapes; each file holds the weights)")
    args = _parse(p, argv)
    from .export import export_for_serving

    if args.overrides and not args.config:
        p.error("overrides need --config")
    model, cfg = _load_weights(args)
    max_len = args.max_len or min(512, model.config.max_position_embeddings)
    if cfg is not None:
        tok = cfg.train_dataset.tokenizer if cfg.train_dataset.tokenizer not in ("", "byte") else ""
    else:  # a Hugging Face directory usually carries its tokenizer
        beside = os.path.join(args.hf, "tokenizer.json") if args.hf else ""
        tok = beside if beside and os.path.isfile(beside) else ""
    if min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    m = export_for_serving(model, args.out, max_len, tok, source=args.ckpt or args.hf, batch_sizes=args.batch_sizes)
    c = m["cache"]
    files = ", ".join(g["file"] for g in m["graphs"].values())
    print(f"wrote {args.out}: {files}, manifest.json{', tokenizer.json' if tok else ''}")
    print(f"cache: {c['kind']} [L={c['layers']}, batch, {c['max_len']}, D={c['D']}] float32, "
          f"{c['bytes_per_token']:,} bytes/token vs {c['full_kv_bytes_per_token']:,} for full K/V "
          f"({c['full_kv_bytes_per_token'] / c['bytes_per_token']:.1f}x smaller)")


@_friendly
def generate_main(argv=None):
    """Generate text from the Python model (--config/--ckpt/--hf) or from exported MindIR files (--mindir):
    greedy or temperature / top-p sampling, all prompts decoded as one batch (any lengths), with time to first
    token and decode tokens/s; --speculative drafts with the MTP module and verifies with the main model (greedy,
    one prompt at a time, both paths)."""
    p = argparse.ArgumentParser(prog="mindpangu-generate", description=generate_main.__doc__)
    p.add_argument("--config", default="", help="YAML recipe (checked against the checkpoint's own config)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    _weights_args(p)
    p.add_argument("--mindir", default="", help="export directory written by tools/export_mindir.py")
    p.add_argument("--prompt", nargs="+", default=["ROMEO:"], help="one or more prompts, decoded as one batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="", help="default: the recipe's or the export's tokenizer, else 'byte'")
    p.add_argument("--max-len", type=int, default=None, help="Python path: cache length (default 512 or less)")
    p.add_argument("--speculative", action="store_true", help="MTP draft + main-model verify (greedy)")
    args = _parse(p, argv)
    import os

    import numpy as np

    from .data.tokenizer import load_tokenizer
    from .inference.generate import MindIRRunner, ModelRunner, Sampler, SpeculativeDecoder, generate

    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampler = Sampler(args.temperature, args.top_p, args.seed)
    tok_path = args.tokenizer
    if args.speculative and args.temperature:
        p.error("--speculative decodes greedily: drop --temperature")
    if args.mindir:
        if args.ckpt or args.hf or args.config:
            p.error("--mindir runs the exported files alone: drop --config/--ckpt/--hf")
        import mindspore as ms

        ms.set_context(mode=ms.GRAPH_MODE)
        runner = MindIRRunner(args.mindir)
        if args.speculative and "speculative" not in runner.graphs:
            p.error(f"--speculative needs the MTP graphs, and {args.mindir} has none (num_mtp_layers = 0)")
        if not tok_path and runner.manifest.get("tokenizer"):
            tok_path = os.path.join(args.mindir, runner.manifest["tokenizer"])
    else:
        model, cfg = _load_weights(args)
        runner = ModelRunner(model, args.max_len or min(512, model.config.max_position_embeddings))
        if not tok_path and cfg is not None:
            tok_path = cfg.train_dataset.tokenizer
        if args.speculative and not model.config.num_mtp_layers:
            p.error("speculative decoding drafts with the MTP module: the model has num_mtp_layers = 0")
    speculative = SpeculativeDecoder(runner) if args.speculative else None
    tok = load_tokenizer(tok_path or "byte")
    prompts = [np.array(tok.encode(text), np.int32) for text in args.prompt]
    runner.warmup(len(prompts))  # compiles the graphs, so the timings below do not include it
    generate(runner, prompts, 2, Sampler())  # and the prefill's first run at these prompt shapes
    if speculative:
        speculative(prompts[0][None], max(1, min(3, runner.max_len - len(prompts[0]))))
    out = generate(runner, prompts, args.max_new_tokens, sampler, tok.eos_id)
    path = "MindIR" if args.mindir else "Python"
    for text, row, n in zip(args.prompt, out["tokens"], out["lengths"]):
        print(f"--- {text!r} -> {tok.decode(row[:n])!r}")
    print(f"    {len(prompts)} prompt(s) in one batch: time to first token {out['ttft_s'] * 1e3:.1f} ms, decode "
          f"{out['decode_tokens_per_s']:.1f} tokens/s ({path}, {int(out['lengths'].sum())} tokens)")
    if speculative:
        for text, ids, n in zip(args.prompt, prompts, out["lengths"]):
            r = speculative.against_greedy(ids, int(n))
            spec, alone = r["speculative"], r["greedy"]
            print(f"    {text!r} speculative (MTP draft): acceptance {spec['acceptance_rate']:.1%} "
                  f"({spec['accepted']}/{spec['drafts']}), mean accepted length {spec['mean_accepted_length']:.2f} "
                  f"tokens/step, {spec['decode_tokens_per_s']:.1f} tokens/s vs {alone['decode_tokens_per_s']:.1f} "
                  f"plain, identical to greedy: {r['identical']}")
            if not r["identical"]:
                raise SystemExit(f"speculative decoding of {text!r} differs from plain greedy decoding: a bug")


@_friendly
def plan_main(argv=None):
    """Print the parallel plan of a recipe on a mesh: rank table, groups, pipeline stage map and memory per
    device (parameters, gradients, optimizer states, activations)."""
    p = argparse.ArgumentParser(prog="mindpangu-plan", description=plan_main.__doc__)
    _config_args(p)
    p.add_argument("--mesh", default="", help="preset (atlas_800t_a2, cloudmatrix_384); default: the YAML's mesh:")
    p.add_argument("--rows", type=int, default=16, help="rank-table rows to show")
    args = _parse(p, argv)
    from .config import load_config
    from .parallel import Layout, resolve_mesh
    from .parallel.report import plan_report

    cfg = load_config(args.config, args.overrides)
    mesh_cfg = cfg.mesh
    if not (args.mesh or mesh_cfg.preset or mesh_cfg.devices_per_node):
        mesh_cfg.preset = "atlas_800t_a2"
    mesh = resolve_mesh(mesh_cfg, args.mesh, Layout.from_config(cfg).world)
    print(plan_report(cfg, mesh, args.rows, args.config))


@_friendly
def simulate_main(argv=None):
    """Predict a recipe's training step on a cluster: compute, exposed communication, pipeline bubble, tokens/s,
    MFU and memory per device (mindpangu/sim; assumptions and validation in docs/simulator.md)."""
    p = argparse.ArgumentParser(prog="mindpangu-simulate", description=simulate_main.__doc__)
    _config_args(p)
    p.add_argument("--mesh", default="", help="preset (atlas_800t_a2, cloudmatrix_384, a100_80gb); default: the "
                                              "YAML's mesh:, else atlas_800t_a2")
    p.add_argument("--devices", type=int, default=0, help="devices (default: the layout's world size)")
    p.add_argument("--imbalance", type=float, default=1.0,
                   help="expert load on the busiest device over the mean (1 + imbalance score); default 1")
    p.add_argument("--ep-a2a", default="flat", choices=["flat", "hierarchical"],
                   help="EP all-to-all across nodes: flat rings, or once per node then inside it (default flat)")
    p.add_argument("--search", action="store_true",
                   help="rank every valid layout that fits on --devices by predicted tokens/s")
    p.add_argument("--top", type=int, default=10, help="search: layouts to print")
    p.add_argument("--write", default="", help="search: write the winner as a mindpangu recipe (and, with "
                                               "--write-mindformers, a mindformers YAML)")
    p.add_argument("--write-mindformers", default="", help="search: the winner as a mindformers YAML")
    args = _parse(p, argv)
    from .config import load_config
    from .parallel import Layout, resolve_mesh
    from .sim.report import format_report, simulate_config

    cfg = load_config(args.config, args.overrides)
    mesh_cfg = cfg.mesh
    if not (args.mesh or mesh_cfg.preset or mesh_cfg.devices_per_node):
        mesh_cfg.preset = "atlas_800t_a2"
    devices = args.devices or Layout.from_config(cfg).world
    mesh = resolve_mesh(mesh_cfg, args.mesh, devices)
    if not args.search:
        print(format_report(simulate_config(cfg, mesh, args.imbalance, args.ep_a2a, devices), mesh))
        return
    from .sim.search import format_search, search, write_winner

    fits, tried = search(cfg, mesh, devices, args.imbalance, args.ep_a2a)
    print(format_search(fits, tried, Layout.from_config(cfg), mesh, devices, args.top))
    if fits and (args.write or args.write_mindformers):
        for path in write_winner(fits[0], args.config, args.overrides, args.write, args.write_mindformers):
            print(f"wrote {path}")


@_friendly
def imbalance_mc_main(argv=None):
    """Monte Carlo of the device imbalance score: uniformly random top-K routing vs MoGE (Pro MoE Fig. 2b)."""
    p = argparse.ArgumentParser(prog="mindpangu-imbalance-mc", description=imbalance_mc_main.__doc__)
    p.add_argument("--trials", type=int, default=100000)
    p.add_argument("--tokens", type=int, default=16, help="|X|, tokens per batch")
    p.add_argument("--experts", type=int, default=64, help="N")
    p.add_argument("--k", type=int, default=8, help="K, experts per token")
    p.add_argument("--groups", type=int, default=8, help="M, devices (= MoGE groups)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default="imbalance_mc.png", help="histogram output ('' to skip)")
    args = _parse(p, argv)
    from .imbalance_mc import run

    summary = run(args.trials, args.tokens, args.experts, args.k, args.groups, args.seed, args.png)
    for name, s in summary.items():
        print(f"{name:<6} mean IS {s['mean']:.4f}  median {s['median']:.4f}  P(IS>0) {s['p_positive']:.4f}  "
              f"max {s['max']:.4f}")
    if args.png:
        print(f"histogram: {args.png}")


@_friendly
def bench_main(argv=None):
    """Benchmarks: ``forward`` (tokens/s in GRAPH and PYNATIVE mode), ``train`` (step time, tokens/s, MFU),
    ``ops`` (the C++ MoE kernels against the composite path), ``compare`` (training tokens/s against transformers'
    DeepseekV3ForCausalLM on the same shape, alternating processes, then a depth sweep; needs the bench extra),
    ``preprocess`` (streaming preprocessing of a generated corpus: MiB/s and peak RSS against the one-document
    baseline), ``convert`` (peak RSS converting a synthetic multi-GB sharded checkpoint both ways), ``serve``
    (time to first token, prefill and decode tokens/s of the MindIR graphs, the Python path and transformers'
    generate on the same shape, batch 1 and 16, alternating processes; the peer needs the bench extra)."""
    p = argparse.ArgumentParser(prog="mindpangu-bench", description=bench_main.__doc__)
    p.add_argument("what", choices=["forward", "train", "ops", "compare", "preprocess", "convert", "serve"])
    p.add_argument("--config", help="YAML recipe (forward, train)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768], help="ops: token counts")
    p.add_argument("--experts", type=int, nargs="+", default=[64, 256], help="ops: expert counts")
    p.add_argument("--batch", type=int, default=None, help="default: runner_config.batch_size")
    p.add_argument("--seq", type=int, default=None, help="default: train_dataset.seq_length")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=None,
                   help="compare, preprocess, serve: runs of each side, alternating (default 3, 1 and 2)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="serve: decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=16, help="serve: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=48, help="serve: generated tokens per sequence")
    p.add_argument("--depths", type=int, nargs="*", default=[4, 16, 48],
                   help="compare: layer counts of the depth sweep (none to skip it)")
    p.add_argument("--size-mb", type=float, default=1024, help="preprocess: MiB of generated JSONL corpus")
    p.add_argument("--baseline-mb", type=float, default=20, help="preprocess: MiB for the one-document baseline")
    p.add_argument("--tokenizer", default=None, help="preprocess: tokenizer (default: the bundled BPE)")
    args = _parse(p, argv)
    from .bench import BUNDLED_TOKENIZER, PEER_RECIPE, bench_compare, bench_forward, bench_ops, bench_preprocess, bench_train
    from .config import load_config

    if args.what == "convert":
        from .bench import bench_convert

        bench_convert(args.overrides)
        return
    if args.what == "preprocess":
        bench_preprocess(args.size_mb, args.baseline_mb, args.tokenizer or BUNDLED_TOKENIZER,
                         args.seq or 1024, rounds=args.rounds or 1)
        return

    if args.what == "serve":
        from .bench import SERVE_RECIPE, bench_serve

        if min(args.batches) < 1 or args.prompt_len < 1 or args.new_tokens < 2:
            p.error("serve needs --batches >= 1, --prompt-len >= 1 and --new-tokens >= 2")
        bench_serve(args.config or SERVE_RECIPE, args.rounds or 2, tuple(args.batches), args.prompt_len,
                    args.new_tokens, overrides=args.overrides)
        return
    if args.what == "compare":
        bench_compare(args.config or PEER_RECIPE, args.rounds or 3, args.repeats, tuple(args.depths),
                      overrides=args.overrides)
        return
    if args.what == "ops":
        bench_ops(tuple(args.tokens), tuple(args.experts), repeats=min(args.repeats, 5))
        return
    if not args.config:
        p.error(f"{args.what} needs --config")
    cfg = load_config(args.config, args.overrides)
    if args.what == "train":
        bench_train(cfg, args.repeats)
    else:
        bench_forward(cfg, args.batch, args.seq, args.repeats)


def sim_compile_main(argv=None):
    """Compile the recipe's training step for its parallel layout as simulated Ascend rank(s) on this CPU (stub CANN
    libraries, MindSpore DryRun level 0) and check every parameter's compiled slice against mindpangu.parallel's
    prediction. Compile-only: no memory figures, no numerics."""
    p = argparse.ArgumentParser(prog="mindpangu-sim-compile", description=sim_compile_main.__doc__)
    _config_args(p)
    p.add_argument("--rank", type=int, nargs="+", default=[0], help="simulated rank(s) to compile as")
    p.add_argument("--out", default="sim_compile",
                   help="directory for logs, strategy files, reports and MindSpore's parallel IR (ir/)")
    p.add_argument("--show", action="store_true", help="list every parameter's compiled slice")
    p.add_argument("--mindformers", action="store_true",
                   help="--config is a mindformers recipe (yaml_configs/mindformers/), compiled through mindformers' "
                        "build_context and Trainer; run with the mindformers environment's python (.venv-mf); "
                        "overrides use the recipe's own keys (model.model_config.hidden_size=64)")
    args = _parse(p, argv)
    from .train.sim_compile import compile_rank

    failed = False
    for rank in args.rank:
        r = compile_rank(args.config, rank, args.out, args.overrides, mindformers=args.mindformers)
        verdict = "all match" if r.ok else f"{len(r.mismatches)} MISMATCH"
        print(f"{args.config} {r.layout} rank {r.rank} (stage {r.stage}): compiled in {r.seconds:.1f} s, "
              f"{len(r.slices)} parameters on this rank, {r.strategies} operator strategies in "
              f"{r.strategy_file}; slices vs prediction: {verdict}")
        for line in r.mismatches:
            print(f"  {line}")
        if "group_sum" in r.all_reduces:
            print(f"  balance-loss statistics all-reduced over ranks {r.all_reduces['group_sum']}")
        if args.show:
            for name in sorted(r.slices):
                print(f"  {name:<60} {r.slices[name]}")
        failed |= not r.ok
    if failed:
        raise SystemExit(1)


def to_mindformers_main(argv=None):
    """Convert a mindpangu recipe to a mindformers YAML (model arch/model_config, parallel_config with the stage
    plan's offset, parallel context, AdamW, LR schedule, callbacks), or back with --reverse."""
    p = argparse.ArgumentParser(prog="mindpangu-to-mindformers", description=to_mindformers_main.__doc__)
    p.add_argument("--config", required=True, help="our recipe, or with --reverse a mindformers YAML")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides (our recipe only)")
    p.add_argument("--out", required=True, help="YAML file to write")
    p.add_argument("--reverse", action="store_true", help="mindformers YAML -> our recipe")
    args = _parse(p, argv)
    import yaml

    from .config import load_config
    from .config.core import build_section
    from .config.schema import TrainConfig
    from .fsutil import write_text_atomic
    from .integrations.mindformers_recipe import from_mindformers, to_mindformers

    if args.reverse:
        if args.overrides:
            p.error("overrides apply to our recipes; edit the mindformers YAML or convert first")
        with open(args.config, encoding="utf-8") as f:
            data = from_mindformers(yaml.safe_load(f))
        build_section(TrainConfig, data, "", {})  # validate before writing
        header = f"# mindpangu recipe converted from the mindformers YAML {os.path.basename(args.config)}\n"
    else:
        data = to_mindformers(load_config(args.config, args.overrides))
        header = (f"# mindformers recipe written by tools/to_mindformers.py from {os.path.basename(args.config)}"
                  f"{' ' + ' '.join(args.overrides) if args.overrides else ''}; needs `import "
                  "mindpangu.integrations.mindformers` (registers the models)\n")
    out_dir = os.path.dirname(os.path.abspath(args.out))

    def relative(value):  # our loader resolves paths against the file's directory: keep the YAML portable
        if isinstance(value, dict):
            return {k: relative(v) for k, v in value.items()}
        if isinstance(value, list):
            return [relative(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value) and os.path.exists(value):
            return os.path.relpath(value, out_dir)
        return value

    write_text_atomic(args.out, header + yaml.safe_dump(relative(data), sort_keys=False))
    print(f"wrote {args.out}")


@_friendly
def ablate_main(argv=None):
    """Reproduce a paper ablation at small scale: run a suite of yaml_configs/ablations/ (arms x learning rates x
    seeds, each run in its own process, resumable), then write results.csv, plots and report.md
    (mindpangu/ablate; the published results are in docs/ablations.md)."""
    from .ablate.suite import SCALES, available_suites

    p = argparse.ArgumentParser(prog="mindpangu-ablate", description=ablate_main.__doc__)
    p.add_argument("--suite", required=True, help="suite name (" + ", ".join(available_suites()) +
                   ") or a suite YAML file")
    p.add_argument("--scale", default="default", choices=SCALES,
                   help="smoke: a few steps, one seed (keeps the tool working); default: fits about 45 minutes on "
                        "a 2-core box; full: deeper, longer, more seeds")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the scale's)")
    p.add_argument("--out", default="", help="output directory (default: output/ablations/<suite>-<scale>)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs at once, each on one runtime thread (default: 2 on 2+ cores); results do not "
                        "depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--publish", default="", help="also copy the report, plots and CSVs into this directory as "
                                                 "<suite>.md and <suite>/ (docs/ablations is the published set)")
    args = _parse(p, argv)
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    import time

    from .ablate.report import publish, write_report
    from .ablate.runner import SuiteFailed, run_suite
    from .ablate.suite import load_suite

    suite = load_suite(args.suite, args.scale, args.seeds)
    out = args.out or os.path.join("output", "ablations", f"{suite.name}-{suite.scale}")
    start = time.perf_counter()
    try:
        results = run_suite(suite, out, args.jobs, not args.no_progress)
    except SuiteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    command = f"mindpangu-ablate --suite {suite.name} --scale {suite.scale}" + \
        (f" --seeds {args.seeds}" if args.seeds is not None else "")  # what reproduces it (--out/--jobs aside)
    path = write_report(suite, results, out, command, time.perf_counter() - start)
    print(f"{len(results)} runs; report: {path}")
    if args.publish:
        print(f"published: {publish(suite, out, args.publish)}")
