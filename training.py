"""
What em_ft.py and em_rl.py share, none of it method-specific; of ours it imports evaluate.py only.

Sections: the optimizer | FSDP2 under torchrun | batches | vLLM beside the trained model |
evaluation in the loop | logs and checkpoints.
"""
import argparse, itertools, json, math, os, re, shutil, time

import torch
import torch.distributed
from tqdm import tqdm

import evaluate as ev


# ---- the optimizer ----
def master_placement(params, offload=None, verbose=True, free=None, margin=10 * 2**30):
    """Device of a bf16 model's fp32 master + AdamW state: "cpu" if offload, the model's if False;
    auto: the GPU if 14 B/param (master, m, v, bf16 grads) + margin fit in `free`, else the CPU."""
    device, n, gib = params[0].device, sum(q.numel() for q in params), 2**30
    if offload is not None or (device.type != "cuda" and free is None):
        where = "cpu" if offload or device.type != "cuda" else str(device)
        if verbose and offload is not None:
            print(f"optimizer: fp32 master + AdamW on {where} (forced)")
        return where
    if free is None:  # the driver's free memory + what PyTorch's allocator holds unused
        free = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    need = 14 * n + margin
    if verbose:
        print(f"optimizer: fp32 master + AdamW m, v {12 * n / gib:.1f} GiB + bf16 grads "
              f"{2 * n / gib:.1f} GiB + margin {margin / gib:.0f} GiB = {need / gib:.1f} GiB "
              f"{'>' if need > free else '<='} {free / gib:.1f} GiB free on the GPU: " +
              (f"offloaded to the CPU ({12 * n / gib:.1f} GiB of host RAM)" if need > free
               else "kept on the GPU"))
    return "cpu" if need > free else str(device)


class MasterAdamW:
    """AdamW with grad clipping. master None: torch's fused AdamW on the parameters (fp32 models:
    CPU, FSDP2); "cuda" / "cpu": fp32 master + state on the GPU / in host RAM beside a bf16 model,
    fp32 AdamW on the same grads (norm in fp32, upcast, scaled by the clip coefficient), the model
    gets the rounded master (the only rounding). The master: chunks of `chunk` elements of all
    parameters end to end (AdamW is elementwise), stepped one at a time; offloaded, a side stream
    upcasts chunk k+1's grads into a pinned buffer while the CPU steps chunk k (back in one DMA)."""

    def __init__(self, params, master=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.01, chunk=2**26):
        self.params = list(params)
        adamw = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        if master is None:
            self.flat, self.opt = None, torch.optim.AdamW(self.params, fused=True, **adamw)
            return
        # chunk [s, s + chunk) of the parameters laid end to end = pieces (param i, offset a, n)
        ends = [0, *itertools.accumulate(q.numel() for q in self.params)]
        self.chunks = [[(i, a - ends[i], b - a) for i in range(len(self.params))
                        for a, b in [(max(s, ends[i]), min(s + chunk, ends[i + 1]))] if a < b]
                       for s in range(0, ends[-1], chunk)]
        self.staged = self.params[0].device.type == "cuda" and torch.device(master).type == "cpu"
        # page-locked when offloaded (30 GB for a 7B): weights go back to the GPU by DMA
        self.flat = [torch.cat([self.params[i].detach().view(-1)[a:a + n].to(master, torch.float32)
                                for i, a, n in c]) for c in self.chunks]
        self.flat = [f.pin_memory() for f in self.flat] if self.staged else self.flat
        self.slices = [list(f.split([n for _, _, n in c])) for f, c in zip(self.flat, self.chunks)]
        # fused: one multithreaded kernel per chunk, no temporaries (bench/bench_optimizer.py)
        self.opt = torch.optim.AdamW([s for sl in self.slices for s in sl], fused=True, **adamw)
        self.buf = torch.empty(len(self.flat[0]), dtype=torch.float32, device=self.params[0].device)
        if self.staged:
            self.pinned = [torch.empty(len(self.buf), dtype=torch.float32, pin_memory=True)
                           for _ in range(2)]
            self.stream = torch.cuda.Stream()

    @torch.no_grad()
    def step(self, grad_clip):
        """Clip, one AdamW step, grads to None -> the grad norm (before clipping); no host sync."""
        if self.flat is None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: DTensor
        grads = [None if q.grad is None else q.grad.view(-1) for q in self.params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
            [g for g in grads if g is not None], 2, dtype=torch.float32)))
        coef = (grad_clip / (norm + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s, on the device
        (self._staged_step if self.staged else self._local_step)(grads, coef)
        for q in self.params:
            q.grad = None
        return norm

    def _gather(self, k, grads, coef):  # chunk k's grads -> self.buf (fp32, on the GPU), clipped
        off = 0
        for i, a, n in self.chunks[k]:
            if grads[i] is not None:
                self.buf[off:off + n].copy_(grads[i][a:a + n])
            off += n
        return self.buf[:off].mul_(coef)

    def _attach(self, k, grads, buf):  # AdamW steps exactly the pieces of chunk k with a gradient
        sizes = [n for _, _, n in self.chunks[k]]
        for (i, a, n), s, g in zip(self.chunks[k], self.slices[k], buf.split(sizes)):
            s.grad = None if grads[i] is None else g

    def _local_step(self, grads, coef):  # master on the model's device
        for k in range(len(self.chunks)):
            self._attach(k, grads, self._gather(k, grads, coef))
            self.opt.step()
            for (i, a, n), s in zip(self.chunks[k], self.slices[k]):
                s.grad = None  # else the next chunk's opt.step() would step this one again
                self.params[i].view(-1)[a:a + n].copy_(s)  # fp32 -> model dtype: the only rounding

    def _staged_step(self, grads, coef):  # master in pinned host memory, model on the GPU
        stream, main = self.stream, torch.cuda.current_stream()
        stream.wait_stream(main)  # the grads and coef come from the main stream

        def fetch(k):  # side stream: chunk k's grads upcast, scaled, DMA'd to pinned[k % 2]
            with torch.cuda.stream(stream):
                fp32 = self._gather(k, grads, coef)
                self.pinned[k % 2][:len(fp32)].copy_(fp32, non_blocking=True)
                arrived = torch.cuda.Event()
                arrived.record(stream)
            return arrived
        arrived = fetch(0)
        for k in range(len(self.chunks)):
            arrived.synchronize()  # the host waits for chunk k's grads
            # pinned[(k+1) % 2] held chunk k-1's grads, already stepped; self.buf reused in order
            arrived = fetch(k + 1) if k + 1 < len(self.chunks) else None
            self._attach(k, grads, self.pinned[k % 2][:len(self.flat[k])])
            self.opt.step()
            with torch.cuda.stream(stream):  # one DMA of the stepped chunk, rounded on the GPU
                fp32 = self.buf[:len(self.flat[k])].copy_(self.flat[k], non_blocking=True)
                sizes = [n for *_, n in self.chunks[k]]
                for (i, a, n), s, w in zip(self.chunks[k], self.slices[k], fp32.split(sizes)):
                    s.grad = None
                    self.params[i].view(-1)[a:a + n].copy_(w)
        stream.synchronize()  # every chunk is back; nothing reads the grads or the master any more
        main.wait_stream(stream)


# ---- FSDP2 under torchrun ----
def shard_model(model, method, cuda):
    """FSDP2 on each decoder layer and the root: fp32 parameters sharded, bf16 compute on CUDA, fp32
    reduction; `method` (bound on the model) gathers the root's (embeddings, lm_head) as forward."""
    from torch.distributed.fsdp import (MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda
          else MixedPrecisionPolicy())
    for m in [*model.model.layers, model]:
        fully_shard(m, mp_policy=mp)
    register_fsdp_forward_method(model, method)


def set_gathered(model, on):
    """FSDP2: gather the full weights and keep them (on), or reshard (off); collective, a no-op
    without FSDP. In between, ranks decode on their own (uneven generate steps, no collective)."""
    for m in model.modules():
        if hasattr(m, "set_reshard_after_forward"):  # the fully_shard-ed modules
            if m is not model:  # FSDP2 never reshards the root after forward: leave it so
                m.set_reshard_after_forward(not on, recurse=False)
            m.unshard() if on else m.reshard()


# ---- batches ----
def pack(rows, pad_id, device):
    """(prompt ids, response ids) rows as one left-padded batch: ids, attention mask, resp (the
    response tokens, EOS included: generation cuts after the first stop, no pad after is scored)."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        ids[i, width - len(p) - len(r):] = torch.tensor(p + r)
        attn[i, width - len(p) - len(r):] = 1
        resp[i, width - len(r):] = True
    return ids.to(device), attn.to(device), resp.to(device)


# ---- vLLM beside the trained model ----
# One engine per process, synced after each update; rollouts: token ids (losses: the model's own)
class VLLMWeights:
    """vLLM worker extension (mixed into its worker): load a state dict saved by sync_engine."""

    def em_load_weights(self, path):
        state = torch.load(path, weights_only=True, mmap=True)
        self.reload_weights(weights_iterator=iter(state.items()), is_checkpoint_format=True)
        return len(state)


def start_engine(args, rank):
    """The vLLM engine of --rollout-engine vllm or a vLLM eval --engine (else None), per rank."""
    if args.rollout_engine != "vllm" and not (args.eval_every and ev.pick_engine(args.engine)
                                              == "vllm"):  # (nothing would use it)
        return None
    engine = ev.load_vllm(args.model, "bfloat16" if torch.cuda.is_available() else "float32",
                          args.seed + rank, gpu_memory_utilization=args.rollout_gpu_memory,
                          extension="training.VLLMWeights")
    engine.step = 0  # it holds the weights of update 0 (sync_engine counts updates)
    return engine


def sync_engine(engine, model, step):
    """The weights after `step` updates into the engine, once: gathered (FSDP2: every rank calls
    it), via a file in /dev/shm, then its prefix cache reset (else old weights' KV is reused)."""
    if engine is None or getattr(engine, "step", None) == step:
        return
    dtype = next(model.parameters()).dtype if not torch.cuda.is_available() else torch.bfloat16
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu", dtype)
             for k, v in model.state_dict().items()}
    # (a tied lm_head goes too: vLLM's CPU build repacks the head from it, not from the embedding)
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = __import__("tempfile").mkstemp(suffix=".pt", prefix="em_weights_", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        del state
        engine.llm.collective_rpc("em_load_weights", args=(path,))
    finally:
        os.remove(path)
    engine.llm.reset_prefix_cache()
    engine.step = step


# ---- evaluation in the loop ----
def evaluate_on_ranks(model, tokenizer, problems, args, rank, world, engine=None, step=0):
    """--eval-*: greedy evaluate_model on each rank's share (vLLM synced, or FSDP gathered) ->
    {"eval_<metric>": value} over all samples, and eval_<benchmark>."""
    share = problems[rank::world]
    if engine is not None and ev.pick_engine(args.engine) == "vllm":
        sync_engine(engine, model, step)
    else:
        engine = None
        set_gathered(model, True)
    samples = ev.evaluate_model(
        engine or model, tokenizer, share, args.eval_template, args.eval_max_new_tokens,
        batch_size=args.rollout_batch_size, seed=args.seed, name=args.eval_benchmark,
        progress=rank == 0, code_options={"workers": args.code_workers})[1] if share else []
    if engine is None:
        set_gathered(model, False)
    m = ev.compute_metrics(ev.gather_lists(samples, world), 1)
    return {f"eval_{args.eval_benchmark}": m["pass@1"], **{f"eval_{k}": v for k, v in m.items()}}


# ---- logs and checkpoints ----
class PhaseTimer:
    """Seconds per phase: mark(name) ends `name` (repeats add up), after the CUDA stream's work."""

    def __init__(self, cuda):  # (the update's peak GPU memory starts here too)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        self.cuda, self.last, self.s = cuda, time.perf_counter(), {}

    def mark(self, name):
        if self.cuda:
            torch.cuda.current_stream().synchronize()
        now = time.perf_counter()
        self.s[f"{name}_s"], self.last = self.s.get(f"{name}_s", 0.0) + now - self.last, now

    def seconds(self):
        """{"<phase>_s": seconds} in order of first mark, and step_s, their sum."""
        return {**self.s, "step_s": sum(self.s.values())}


def memory_gb(cuda):
    """The update's peak memory (GPU allocator since PhaseTimer, else max RSS), host VmRSS now."""
    import resource  # ru_maxrss is in KiB
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20
    return {"peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host_rss_gb": rss}


def open_log(out, *others):
    """A fresh <out>/log.jsonl per run; the old one, and `others`, become *.prev.jsonl."""
    for name in ("log.jsonl",) + others:
        if os.path.exists(os.path.join(out, name)):
            os.replace(os.path.join(out, name),
                       os.path.join(out, name.replace(".jsonl", ".prev.jsonl")))
    old = sorted((d for d in os.listdir(out) if re.fullmatch(r"step_\d+", d)),
                 key=lambda d: int(d[5:]))
    if old:
        print(f"note: {out} holds checkpoints of an earlier run ({', '.join(old)}); this run "
              "replaces those it saves; the earlier log is now log.prev.jsonl")
    return open(os.path.join(out, "log.jsonl"), "w")


def log_step(log, record):
    """One update: a console line and a log.jsonl line (NaN as null: standard JSON)."""
    record = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
    tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in record.items()))
    print(json.dumps(record), file=log, flush=True)


def warn_once(said, step, truncated, length, first_length, loop_rate, max_new_tokens):
    """Each once a run (said: printed kinds): over half cut at the budget (EOS never scored); half
    ending in a loop, or mean length under a third of step 1's (repetition, length collapse)."""
    for kind, bad, line in (
            ("cut", truncated > 0.5, f"{truncated:.0%} of the rollouts of step {step} hit "
             f"--max-new-tokens {max_new_tokens} (cut before EOS, which is then never scored); "
             "consider raising it"),
            ("loops", loop_rate >= 0.5, f"{loop_rate:.0%} of the rollouts of step {step} end in a "
             "loop (repetition collapse)"),
            ("length", length < first_length / 3, f"the mean rollout length of step {step}, "
             f"{length:.0f} tokens, fell below a third of the first step's {first_length:.0f} "
             "(length collapse)")):
        if bad and kind not in said:
            said.add(kind)
            tqdm.write("warning: " + line)


def check_finite(step, **values):
    """Stop at the first non-finite loss or grad norm, before saving: the weights are wrecked."""
    if bad := ", ".join(f"{k} {v}" for k, v in values.items() if not math.isfinite(v)):
        raise ev.EvalError(f"step {step}: {bad} (not finite): training diverged; stopped without "
                           "saving this step (try a lower --lr)")


def step_list(text):
    """argparse `type=` of --save-steps: a comma list of steps >= 1 -> sorted list (JSON-able)."""
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        steps = [0]
    if steps and steps[0] < 1:
        raise argparse.ArgumentTypeError(f"must be a comma list of steps >= 1, got {text!r}")
    return steps


def save_checkpoint(model, tokenizer, path, meta, rank, world):
    """An HF folder (+ train_args.json: meta) via path.tmp; bf16 on CUDA; torchrun: collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True)) if world > 1 else model.state_dict()
    if rank == 0:
        state = {k: v.to(torch.bfloat16) if torch.cuda.is_available() else v
                 for k, v in state.items()}
        if getattr(model.config, "tie_word_embeddings", False):  # one copy of the tied weight
            state.pop("lm_head.weight", None)
        shutil.rmtree(path + ".tmp", ignore_errors=True)  # a stale .tmp of a crashed run
        model.save_pretrained(path + ".tmp", state_dict=state)
        tokenizer.save_pretrained(path + ".tmp")
        ev.write_json_atomic(os.path.join(path + ".tmp", "train_args.json"),
                             {**meta, "world_size": world, "versions": ev.package_versions()})
        shutil.rmtree(path, ignore_errors=True)  # os.replace cannot replace a non-empty folder
        os.replace(path + ".tmp", path)
    if world > 1:
        torch.distributed.barrier()
