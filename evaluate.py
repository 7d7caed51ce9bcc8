"""
Math evaluation for em-scripts: benchmarks, prompts, batched generation, answer extraction and grading.
It is both a CLI and the one module the method scripts (em_ft.py, em_rl.py, em_inf.py, select_prompt.py) import.

Protocol (both papers' headline protocol, printed into results.json): the Qwen2.5-Math chain-of-thought prompt --
the tokenizer's chat template with the system message "Please reason step by step, and put your final answer
within \\boxed{}." and the bare problem as the user message; zero-shot; greedy; up to 3072 new tokens; stop at
eos/<|im_end|>/<|endoftext|>; answer = content of the last \\boxed{} of the response; graded by math-verify against
the gold answer. Sampling (--temperature --top-p --n) adds maj@n and unbiased pass@k.

    # 1 GPU (bf16), all of One-shot EM's math benchmarks from the Hugging Face Hub
    python evaluate.py --model Qwen/Qwen2.5-Math-7B --benchmarks math500,amc23,minerva,olympiadbench,aime24
    # offline, from local copies of the benchmark files (e.g. ../shared/benchmarks)
    python evaluate.py --model Qwen/Qwen2.5-Math-7B --data-dir ../shared/benchmarks --benchmarks math500
    # any JSON/JSONL/parquet file with a problem and an answer column
    python evaluate.py --model ckpt/step_2 --data my.jsonl --problem-key question --answer-key final
    # sampled: 8 samples per problem at T=0.6 -> pass@1 (mean of 8), maj@8, pass@{1,2,4,8}
    python evaluate.py --model ckpt/step_2 --benchmarks amc23 --temperature 0.6 --top-p 0.95 --n 8
    # CPU smoke run on a tiny random model (gibberish answers, exercises every code path)
    python tests/tiny_model.py /tmp/tiny
    python evaluate.py --model /tmp/tiny --data ../shared/benchmarks/math500.jsonl --limit 20 --max-new-tokens 64

Multi-GPU: run one process per GPU on disjoint --benchmarks (evaluation needs no communication).
Outputs (in --out): results.json (metrics + full protocol + package versions), samples.jsonl (one line per
response). A run interrupted and restarted with the same arguments reuses finished batches: each batch is seeded
from (seed, benchmark, batch index), so the resumed run produces exactly what an uninterrupted run would.
"""
import argparse, json, math, os, re, sys, threading, time, zlib
from collections import Counter
from importlib.metadata import version

import torch
from tqdm import tqdm

# ----------------------------------------------------------------------------- benchmarks
# name -> (local file name, hub id, hub config, hub split). Columns are found by PROBLEM_KEYS / ANSWER_KEYS.
BENCHMARKS = {
    "math500": ("math500.jsonl", "HuggingFaceH4/MATH-500", None, "test"),
    "amc23": ("amc23.jsonl", "math-ai/amc23", None, "test"),
    "aime24": ("aime24.jsonl", "HuggingFaceH4/aime_2024", None, "train"),
    "aime25": ("aime25.jsonl", "math-ai/aime25", None, "test"),
    "minerva": ("minerva_math.jsonl", "math-ai/minervamath", None, "test"),
    "olympiadbench": ("olympiadbench.jsonl", "math-ai/olympiadbench", None, "test"),
    "gsm8k": ("gsm8k.jsonl", "openai/gsm8k", "main", "test"),
    "aimo-amc": ("aimo_amc.jsonl", "AI-MO/aimo-validation-amc", None, "train"),  # Agarwal et al.'s AMC (83)
    "aimo-aime": ("aimo_aime.jsonl", "AI-MO/aimo-validation-aime", None, "train"),  # Agarwal et al.'s AIME (90)
}
PROBLEM_KEYS = ("problem", "question", "prompt", "input")
# "solution" last: its gold is the last \boxed{} of a worked solution (Minerva has no answer column).
ANSWER_KEYS = ("answer", "final_answer", "reward_model.ground_truth", "ground_truth", "solution")


class EvalError(Exception):
    """Bad user input (unknown benchmark, missing file/column, empty data...): CLIs print it as one line."""


def _get(row, key):  # dotted keys reach into nested columns, e.g. "reward_model.ground_truth"
    for part in key.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def _read_rows(path):
    if not os.path.isfile(path):
        raise EvalError(f"no such file: {path}")
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq  # comes with datasets
            return pq.read_table(path).to_pylist()
        with open(path) as f:
            if path.endswith(".jsonl"):
                return [json.loads(line) for line in f if line.strip()]
            data = json.load(f)
    except (ValueError, OSError) as e:
        raise EvalError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, list) else data.get("data", data.get("rows", [data]))


def _gold(value, key):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):  # OlympiadBench: a list of answers; the first is the gold
        value = value[0] if value else None
        return None if value is None else _gold(value, key)
    if isinstance(value, float) and value.is_integer():  # AMC stores 27 as 27.0
        value = int(value)
    value = str(value).strip()
    if key == "solution":  # gold = last \boxed{} of a worked solution (Minerva)
        return extract_answer(value)
    if "####" in value:  # GSM8K: "...reasoning...\n#### 1,234"
        value = value.split("####")[-1].strip().replace(",", "")
    return value


def load_benchmark(name_or_path, data_dir=None, problem_key=None, answer_key=None, split=None, limit=None,
                   require_answer=True):
    """Load a benchmark by name (local file under data_dir, else the Hugging Face Hub), a local
    .json/.jsonl/.parquet file, or a hub dataset id. Returns [{"id", "problem", "answer"}] (answer may be None
    when require_answer=False)."""
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    if name_or_path in BENCHMARKS:
        fname, hub_id, config, hub_split = BENCHMARKS[name_or_path]
        source = os.path.join(data_dir, fname) if data_dir else None
    elif name_or_path.endswith((".json", ".jsonl", ".parquet")):
        source, hub_id = name_or_path, None
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) and not os.path.exists(name_or_path):
        source, hub_id, config, hub_split = None, name_or_path, None, "train"
    else:
        raise EvalError(f"unknown benchmark {name_or_path!r}: use one of {', '.join(BENCHMARKS)}, a .json/.jsonl/"
                        ".parquet file, or a hub dataset id (org/name)")
    if source:
        rows = _read_rows(source)
    else:
        import datasets
        try:
            rows = datasets.load_dataset(hub_id, config, split=split or hub_split).to_list()
        except Exception as e:  # offline, no such dataset, no such split: one line, not a traceback
            raise EvalError(f"cannot load {hub_id} from the Hugging Face Hub ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); pass a local file or --data-dir") from None
    if not rows:
        raise EvalError(f"{name_or_path}: the dataset is empty")
    columns = sorted(rows[0]) if isinstance(rows[0], dict) else []
    pkey = problem_key or next((k for k in PROBLEM_KEYS if _get(rows[0], k) is not None), None)
    akey = answer_key or next((k for k in ANSWER_KEYS if _get(rows[0], k) is not None), None)
    if pkey is None or _get(rows[0], pkey) is None:
        raise EvalError(f"{name_or_path}: no problem column {problem_key or PROBLEM_KEYS} (columns: {columns}); "
                        "name it with --problem-key")
    if require_answer and (akey is None or _get(rows[0], akey) is None):
        raise EvalError(f"{name_or_path}: no answer column {answer_key or ANSWER_KEYS} (columns: {columns}); "
                        "name it with --answer-key")
    ids = [str(r.get("unique_id", r.get("id", i))) for i, r in enumerate(rows)]
    if len(set(ids)) != len(ids):  # the file's own ids are not unique: fall back to the row index
        ids = [str(i) for i in range(len(rows))]
    out = []
    for i, row in zip(ids, rows):
        problem = _get(row, pkey)
        if isinstance(problem, list):  # chat-format prompt (e.g. DeepScaleR): the last user message
            problem = [m["content"] for m in problem if m.get("role") == "user"][-1]
        out.append({"id": i, "problem": str(problem), "answer": _gold(_get(row, akey), akey) if akey else None})
    return out[:limit] if limit else out


# ----------------------------------------------------------------------------- prompts
COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# name -> (system message or None for the model's default, user message, use chat template)
TEMPLATES = {
    "qwen-math": (COT_SYSTEM, "{problem}", True),  # Qwen2.5-Math CoT eval protocol (both papers)
    "agarwal": (COT_SYSTEM, "{problem} Let us think step by step and output the final answer within \\boxed{}",
                True),  # Agarwal et al.'s training/eval prompt
    "chat": (None, "{problem}", True),  # bare problem, model's default system prompt (One-shot EM training)
    "plain": (None, "Question: {problem}\n" + COT_SYSTEM + "\nAnswer:", False),  # base models w/o chat template
}


def build_prompt(tokenizer, problem, template="qwen-math"):
    if template not in TEMPLATES:
        raise EvalError(f"unknown template {template!r}: use one of {', '.join(TEMPLATES)}")
    system, user, chat = TEMPLATES[template]
    user = user.replace("{problem}", problem)  # not str.format: problems are full of LaTeX braces
    if not chat:
        return user
    if not tokenizer.chat_template:
        raise EvalError(f"template {template!r} needs a chat template and this tokenizer has none; "
                        "use --template plain")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------- generation
def stop_token_ids(tokenizer, model=None):
    """eos of the tokenizer and of the model's generation config, plus Qwen's <|im_end|>/<|endoftext|>."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
    return sorted(i for i in ids if i is not None)


def length_sorted_batches(lengths, batch_size):
    """Index batches over items sorted longest first: little padding per batch, and an OOM shows at once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


ENGINES = ("auto", "continuous", "static")
_ENGINE_NOTES = set()  # fallback reasons already printed (each once per process)
# GenerationConfig fields continuous batching applies as generate does (sampling warpers: temperature, top-k, top-p).
CONTINUOUS_OPTIONS = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                      "pad_token_id", "use_cache"}


def continuous_blockers(model, config, logits_processor=None):
    """What in this request transformers' continuous batching would not run exactly as `generate` does; [] = it
    serves the request. Decided here, not left to transformers: in 5.24 its generate_batch ignores a
    logits_processor argument, drops the processors it marks unsupported (repetition penalty, ...) with only a log
    warning, never builds some (min_new_tokens) and keeps the ones it has not classified. So only an allowlist of
    options passes (CONTINUOUS_OPTIONS, whose processors it must also mark supported); anything else -- custom
    processors (EM-INF's, LogitStats), a repetition penalty, an FSDP-wrapped model, autocast -- is a reason."""
    import transformers
    if not hasattr(transformers, "ContinuousBatchingConfig"):
        return [f"transformers {transformers.__version__} has no continuous batching"]
    reasons = []
    if not hasattr(model, "init_continuous_batching"):
        reasons.append(f"{type(model).__name__} has no continuous batching")
    if logits_processor:
        reasons.append("custom logits processors (" + ", ".join(type(p).__name__ for p in logits_processor) + ")")
    # Thread-local state does not reach the manager's generation thread: autocast would silently be off there.
    if torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"):
        reasons.append("autocast (it does not reach the continuous-batching thread)")
    # FSDP2: forwards in another thread would run FSDP's hooks there; the scripts' gathered-weights discipline
    # (no collective while generating) is only established for the static path.
    from torch.distributed.fsdp import FSDPModule
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        reasons.append("an FSDP-wrapped model")
    if model.config._attn_implementation not in ("sdpa", "eager", "paged|eager") and "flash" not in str(
            model.config._attn_implementation):
        reasons.append(f"attention {model.config._attn_implementation}")
    # Generation options: an allowlist of what continuous batching honours. Anything else (a repetition penalty,
    # min_new_tokens -- whose processor it never even builds --, beams, ...) is a reason, with its value.
    neutral = {"repetition_penalty": 1.0}  # generate_batch always sets it; 1.0 is a no-op
    reasons += [f"{k}={v}" for k, v in config.to_diff_dict().items() if k not in CONTINUOUS_OPTIONS
                and k != "transformers_version" and not (k in neutral and v == neutral[k])]
    if reasons or not hasattr(model, "_get_logits_processor"):
        return reasons
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = model._get_logits_processor(config)  # the very list continuous batching builds from the config
    reasons += [type(p).__name__ for p in built if getattr(p, "supports_continuous_batching", None) is not True]
    return reasons


def pick_engine(model, config, logits_processor=None, engine="auto"):
    """"continuous" or "static" for this request. --engine continuous on a request it cannot serve is an error;
    auto falls back to static and says why, once per reason. auto on a CPU model is static: measured there
    (bench/bench_generate.py, SmolLM2-135M, GSM8K, 256 tokens, an idle 2-core machine) continuous batching took
    2x the static path's time -- its SDPA path attends every query to the whole batch's cache through a mask."""
    if engine not in ENGINES:
        raise EvalError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "static":
        return "static"
    reasons = continuous_blockers(model, config, logits_processor)
    if reasons and engine == "continuous":
        raise EvalError("--engine continuous cannot run this request exactly: " + "; ".join(reasons))
    note = ("continuous batching would not apply: " + "; ".join(reasons) if reasons else
            "auto on the CPU, where continuous batching measured slower; --engine continuous to use it"
            if engine == "auto" and model.device.type == "cpu" else "")
    if note and note not in _ENGINE_NOTES:
        _ENGINE_NOTES.add(note)
        print(f"engine: static generate ({note})", flush=True)
    return "static" if note else "continuous"


def continuous_generate(model, inputs, config, seed=None, cuda_graph=None, limits=None):
    """New token ids for each prompt (token id lists) from one continuous-batching run of transformers: a row that
    stops frees its slot and costs no more compute, and no row is padded. Every request is queued before the
    generation thread starts, so the schedule -- and with it every sampled token -- is a function of the inputs and
    the seed. Memory: the paged KV cache is sized for every row at full length (longest prompt + max_new_tokens,
    rounded up to a page) -- what the static path's cache reaches when a row runs to the budget -- so the caller's
    batch size stays the memory knob; the manager is stopped and dropped before returning, which frees the cache
    before any backward (tests check no PagedAttentionCache or thread survives; RSS stays flat over calls).
    cuda_graph: None = transformers' choice (on with flash attention); limits: per-row new-token budgets (the
    benchmark's stand-in for stop tokens on random weights)."""
    from transformers import ContinuousBatchingConfig
    longest = max(map(len, inputs)) + config.max_new_tokens
    page = 256 if longest > 1024 else 64
    flash = "flash" in str(model.config._attn_implementation)
    if seed is None:  # continue the caller's random stream, as the static path does
        seed = int(torch.randint(2 ** 31 - 1, ()))
    # Without flash attention its SDPA/eager path allocates a [max_batch_tokens, cache + max_batch_tokens] mask up
    # front: 1024 tokens per step keeps that mask small beside the cache (prefill is chunked, results unchanged).
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=len(inputs) * -(-longest // page), seed=seed,
                                  max_requests_per_batch=len(inputs), max_batch_tokens=None if flash else 1024,
                                  use_cuda_graph=cuda_graph)
    was_training = model.training
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb)
    done = {}
    try:
        if limits is None:
            ids = manager.add_requests(inputs, max_new_tokens=config.max_new_tokens)
        else:
            ids = [manager.add_request(x, f"row{i}", n) for i, (x, n) in enumerate(zip(inputs, limits))]
        manager.start()
        while len(done) < len(ids):
            r = manager.get_result(timeout=1)
            if r is None and not manager.is_running():
                break
            if r is not None and r.is_finished():
                done[r.request_id] = r
    finally:
        manager.stop(block=True)
        manager.destroy()
        del manager
        model.train(was_training)
    bad = [i for i in ids if i not in done or done[i].error is not None]
    if bad:
        err = done[bad[0]].error if bad[0] in done else "no result"
        raise RuntimeError(f"continuous batching failed on {len(bad)} of {len(ids)} prompts ({err}); "
                           "rerun with --engine static")
    return [list(done[i].generated_tokens) for i in ids]


@torch.no_grad()
def generate_batch(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=None,
                   repetition_penalty=1.0, logits_processor=None, top_k=0, engine="auto"):
    """Returns per prompt {"ids", "text", "truncated"}: ids are the completion tokens up to and including the
    first stop token; truncated = no stop token within the budget. engine: "static" = one left-padded, KV-cached
    `generate` call (runs until the batch's longest row ends); "continuous" = continuous_generate (the same greedy
    tokens, tested; sampled ones come from another random stream); "auto" = continuous wherever it runs the
    request exactly (continuous_blockers) on a GPU, else static (pick_engine)."""
    from transformers import GenerationConfig
    stops = stop_token_ids(tokenizer, model)
    # A full config, not the model's: its generation_config.json may carry top_k/repetition_penalty defaults
    # (Qwen instruct models do) that would silently change the protocol. top_k must be 0, not None, to be off:
    # transformers fills a None from the model's generation_config (or its global default, 50).
    sample = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample
                              else None, top_p=top_p if sample else None, top_k=top_k if sample else None,
                              repetition_penalty=repetition_penalty, eos_token_id=stops,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
                              use_cache=True)
    if pick_engine(model, config, logits_processor, engine) == "continuous":
        rows = continuous_generate(model, [tokenizer(p, add_special_tokens=False).input_ids for p in prompts],
                                   config, seed)
        return [cut_at_stop(row, stops, tokenizer) for row in rows]
    tokenizer.padding_side = "left"  # decoder-only batching: the last prompt token must sit at the right edge
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    if seed is not None:
        torch.manual_seed(seed)
    # synced_gpus=False: under torchrun the scripts hold full (gathered) weights on every rank while generating, so
    # ranks decode independently. transformers would turn synced_gpus on for FSDP-managed models and all_reduce at
    # every step: a deadlock as soon as ranks make different numbers of generate calls (e.g. uneven eval shares).
    out = model.generate(**enc, generation_config=config, logits_processor=logits_processor, synced_gpus=False)
    return [cut_at_stop(row, stops, tokenizer) for row in out[:, enc["input_ids"].shape[1]:].tolist()]


def cut_at_stop(row, stops, tokenizer):
    """generate_batch's record of one row of new tokens (static rows are padded after their stop token)."""
    end = next((j for j, t in enumerate(row) if t in stops), None)
    ids = row if end is None else row[:end + 1]
    return {"ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True), "truncated": end is None}


class LogitStats:
    """Logit-shift analysis (One-shot EM's key figure: EM moves logit skewness right, RL moves it left).
    A transformers logits processor that observes, at every generated position of unfinished rows:
    - skew_vocab: the biased Fisher-Pearson skewness of the raw logit vector over the full vocabulary, averaged
      over tokens; entropy: the mean entropy of softmax(raw logits);
    - skew_topk_pooled: the released analysis' statistic -- logits divided by the sampling temperature, top-k
      filtered (others dropped), pooled over all steps and prompts, then one skewness of the pooled values
      (their protocol: first 20 DeepScaleR prompts, 500 tokens, T=0.6, top-k 50 -> `--temperature 0.6 --top-k 50`).
    Everything is accumulated on the device as float64 sums (pooled moments as power sums): nothing is stored per
    token and nothing syncs with the host until result(). -inf logits (masked by another processor) are left out."""

    HIST = (-5.0, 15.0, 400)  # per-token skew_vocab histogram (for the figure): range and bins; outliers -> end bins

    def __init__(self, stop_ids, temperature=1.0, top_k=50):
        self.stop_ids, self.temperature, self.top_k = torch.tensor(stop_ids), temperature or 1.0, top_k or 50
        self.acc, self.done = None, None  # on-device sums (see result()); rows finished in this generate call
        lo, hi, bins = self.HIST
        self.edges, self.hist = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)[1:], None  # upper bin edges

    def __call__(self, input_ids, scores):
        if self.hist is None:  # first step: constants to the device once (a copy per step would sync on CUDA)
            self.stop_ids, self.edges = self.stop_ids.to(scores.device), self.edges.to(scores.device)
            self.hist = torch.zeros(self.HIST[2], dtype=torch.float64, device=scores.device)
        stopped = torch.isin(input_ids[:, -1], self.stop_ids)
        # rows that emitted a stop token are padding from here on (the first call sees prompts: none finished)
        self.done = torch.zeros_like(stopped) if self.done is None else self.done | stopped
        live = (~self.done).double()
        # Masks instead of boolean indexing, and sums kept on the device: no host sync per decoding step.
        z = scores.float()
        logp = z.log_softmax(-1)
        ent = -(logp.exp() * logp).nan_to_num().sum(-1)  # masked (-inf) tokens: 0 * -inf -> nan -> 0
        f = z.isfinite()  # skewness over the finite logits only
        n = f.sum(-1).clamp_min(1)
        d = (z - (z.where(f, 0).sum(-1) / n)[:, None]).where(f, 0)
        skew = (d ** 3).sum(-1) / n / ((d ** 2).sum(-1) / n).clamp_min(1e-12) ** 1.5
        x = (z / self.temperature).topk(min(self.top_k, z.shape[-1]), dim=-1).values.double()
        keep = x.isfinite() & ~self.done[:, None]
        x = x.where(keep, 0)
        sums = torch.stack([live.sum(), (ent.double() * live).sum(), (skew.double() * live).sum(),
                            keep.sum().double(), x.sum(), (x ** 2).sum(), (x ** 3).sum()])
        self.acc = sums if self.acc is None else self.acc + sums
        # bin i holds skew in (lo + i*w, lo + (i+1)*w]; clamped, so values past the range land in the end bins
        b = torch.bucketize(skew.double(), self.edges).clamp_max(self.HIST[2] - 1)
        self.hist.index_add_(0, b, live)
        return scores

    def result(self):
        tokens, ent, skew, n, s1, s2, s3 = self.acc.tolist() if self.acc is not None else [0] * 7
        mean = s1 / max(n, 1)
        m2, m3 = s2 / max(n, 1) - mean ** 2, s3 / max(n, 1) - 3 * mean * s2 / max(n, 1) + 2 * mean ** 3
        return {"tokens": int(tokens), "entropy": ent / max(tokens, 1), "skew_vocab": skew / max(tokens, 1),
                "skew_topk_pooled": m3 / max(m2, 1e-12) ** 1.5 if n else float("nan"),
                "skew_topk_temperature": self.temperature, "skew_topk_k": self.top_k,
                "skew_vocab_hist": {"range": list(self.HIST[:2]), "counts": [int(c) for c in (
                    self.hist.tolist() if self.hist is not None else [0] * self.HIST[2])]}}


def plot_logit_stats(results, path):
    """Histogram of per-token logit skewness, one curve per benchmark, to path (PNG) -- only if matplotlib happens
    to be installed (it is not a dependency). Returns whether it wrote the file."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    used = []  # occupied bins over all curves: the x-axis shows those, not the whole fixed range
    for name, r in results.items():
        h = r["logit_stats"]["skew_vocab_hist"]
        lo, hi = h["range"]
        w = (hi - lo) / len(h["counts"])
        total = max(sum(h["counts"]), 1)
        ax.step([lo + (i + 0.5) * w for i in range(len(h["counts"]))], [c / total for c in h["counts"]],
                where="mid", label=f"{name} (mean {r['logit_stats']['skew_vocab']:.2f})")
        used += [lo + i * w for i, c in enumerate(h["counts"]) if c]
    if used:
        ax.set_xlim(min(used) - 5 * w, max(used) + 6 * w)
    ax.set(xlabel="skewness of the logit vector (per generated token)", ylabel="share of tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return True


# ----------------------------------------------------------------------------- answers and grading
def extract_answer(response, fallback=False):
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces; None if there is none.
    fallback=True adds the Qwen2.5-Math harness's fallbacks (One-shot EM's eval): "the answer is X", else the last
    number of the response."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", response)]
    if starts:
        depth, start = 1, starts[-1]
        for j in range(start, len(response)):
            depth += {"{": 1, "}": -1}.get(response[j], 0)
            if depth == 0:
                return response[start:j].strip()
        # unbalanced: the last box never closes; an earlier box cannot be "the last one" either
    if not fallback:
        return None
    said = re.findall(r"answer is:?\s*\$?([^\n$]+?)\$?\s*(?:\.\s|\.?$|\n)", response, flags=re.IGNORECASE)
    if said:
        return said[-1].strip()
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", response)
    return numbers[-1].replace(",", "") if numbers else None


def normalize_answer(ans):
    ans = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ |\$|\s", "", ans).replace("dfrac", "frac").replace("tfrac", "frac")
    ans = re.sub(r"\\text\{(.*?)\}", r"\1", ans).rstrip(".")
    return re.sub(r"^(-?\d+)\.0+$", r"\1", ans)


MAX_ANSWER_CHARS = 1000  # longer "answers" are degenerate output; math-verify on them only burns its timeout


def grade_answer(pred, gold, timeout=5):
    """Returns (correct, error): error=True when math-verify timed out or raised (counted as wrong)."""
    if pred is None or gold is None:
        return False, False
    if normalize_answer(pred) == normalize_answer(gold):
        return True, False
    if len(pred) > MAX_ANSWER_CHARS:
        return False, True
    # Minerva golds use scientific notation ("4.5e33"), which math-verify does not read as a number.
    pred, gold = (re.sub(r"^(-?\d+(?:\.\d+)?)e([-+]?\d+)$", r"\1\\times 10^{\2}", a.strip()) for a in (pred, gold))
    from math_verify import parse, verify
    # math-verify guards itself with signal.alarm, which only works in the main thread.
    t = timeout if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$", parsing_timeout=t,
                  raise_on_error=True)
        p = parse(f"${pred}$", parsing_timeout=t, raise_on_error=True)
        return bool(g and p and verify(g, p, timeout_seconds=t, raise_on_error=True)), False
    except BaseException as e:  # math-verify's TimeoutException, sympy errors, RecursionError...
        if isinstance(e, KeyboardInterrupt):
            raise
        return False, True


def is_correct(response, gold, fallback=False):
    return grade_answer(extract_answer(response, fallback), gold)[0]


# ----------------------------------------------------------------------------- metrics
def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def compute_metrics(samples, n):
    """samples: dicts with id, correct, extracted, length, truncated, grade_error (n per problem)."""
    by_id = {}
    for s in samples:
        by_id.setdefault(s["id"], []).append(s)
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, n) if k <= n})
    m = {"problems": len(by_id), "samples": len(samples),
         "pass@1": 100 * sum(s["correct"] for s in samples) / max(len(samples), 1)}
    for k in ks[1:]:
        m[f"pass@{k}"] = 100 * sum(pass_at_k(len(g), sum(s["correct"] for s in g), k)
                                   for g in by_id.values()) / len(by_id)
    if n > 1:  # majority vote over normalized extracted answers; a problem counts if the top answer is right
        maj = 0
        for g in by_id.values():
            votes = Counter(normalize_answer(s["extracted"]) for s in g if s["extracted"] is not None)
            if votes:
                top = votes.most_common(1)[0][0]
                maj += next(s["correct"] for s in g
                            if s["extracted"] is not None and normalize_answer(s["extracted"]) == top)
        m[f"maj@{n}"] = 100 * maj / len(by_id)
    # format = a parsable \\boxed{} answer, whatever --answer-fallback extracted
    m["format_rate"] = 100 * sum(s.get("boxed", s["extracted"] is not None) for s in samples) / max(len(samples), 1)
    m["truncated_rate"] = 100 * sum(s["truncated"] for s in samples) / max(len(samples), 1)
    m["mean_length"] = sum(s["length"] for s in samples) / max(len(samples), 1)
    m["grading_errors"] = sum(s["grade_error"] for s in samples)
    return m


# ----------------------------------------------------------------------------- evaluation
def evaluate_model(model, tokenizer, problems, template="qwen-math", max_new_tokens=3072, temperature=0.0,
                   top_p=1.0, n=1, batch_size=32, seed=0, name="eval", done=None, on_batch=None, progress=True,
                   logits_processor=None, top_k=0, logit_stats=False, answer_fallback=False, engine="auto"):
    """Evaluate an in-memory model on problems (from load_benchmark). Returns (metrics, samples).
    done: {(id, sample_index): sample} reused instead of regenerated (resume); on_batch(new_samples) is called
    after each generated batch (the CLI appends them to samples.jsonl). logit_stats: add metrics["logit_stats"]
    (see LogitStats) over the batches generated in this call. engine: generate_batch's; either engine generates
    batch by batch with the same per-batch seeds, so a resumed run reproduces an uninterrupted one."""
    if n > 1 and temperature <= 0:
        raise EvalError("--n > 1 needs --temperature > 0 (greedy samples are identical)")
    done = done or {}
    jobs = [(p, j) for p in problems for j in range(n)]
    prompts = {p["id"]: build_prompt(tokenizer, p["problem"], template) for p in problems}
    lengths = [len(tokenizer(prompts[p["id"]], add_special_tokens=False).input_ids) for p, _ in jobs]
    context = getattr(model.config, "max_position_embeddings", None)
    if context and max(lengths) >= context:
        raise EvalError(f"{name}: a prompt of {max(lengths)} tokens does not fit the model's context of {context}")
    if context and max(lengths) + max_new_tokens > context and progress:
        print(f"warning: {name}: prompt ({max(lengths)} tokens) + --max-new-tokens {max_new_tokens} exceeds the "
              f"model's context of {context}; long responses run past the trained positions")
    stats = LogitStats(stop_token_ids(tokenizer, model), temperature, top_k) if logit_stats else None
    processors = list(logits_processor or []) + ([stats] if stats else [])  # stats see what gets sampled
    was_training = model.training
    model.eval()
    samples, new_tokens, t0 = [], 0, time.time()
    bar = tqdm(total=len(jobs), desc=name, disable=not progress, dynamic_ncols=True)
    for b, batch in enumerate(length_sorted_batches(lengths, batch_size)):
        keys = [(jobs[i][0]["id"], jobs[i][1]) for i in batch]
        if all(k in done for k in keys):  # finished before an interruption: reuse, do not regenerate
            samples += [done[k] for k in keys]
            bar.update(len(batch))
            continue
        if stats:
            stats.done = None  # a new generate call: no row has finished yet
        # A seed per (seed, benchmark, batch): sampling is the same whether or not earlier batches were skipped.
        outs = generate_batch(model, tokenizer, [prompts[k[0]] for k in keys], max_new_tokens, temperature, top_p,
                              seed=zlib.crc32(f"{seed}/{name}/{b}".encode()), logits_processor=processors or None,
                              top_k=top_k, engine=engine)
        fresh = []
        for i, k, o in zip(batch, keys, outs):
            p = jobs[i][0]
            extracted = extract_answer(o["text"], answer_fallback)
            correct, error = grade_answer(extracted, p["answer"])
            fresh.append({"benchmark": name, "id": p["id"], "sample": k[1], "prompt": prompts[k[0]],
                          "response": o["text"], "extracted": extracted, "boxed": extract_answer(o["text"]) is not None,
                          "gold": p["answer"], "correct": correct,
                          "grade_error": error, "length": len(o["ids"]), "truncated": o["truncated"]})
            new_tokens += len(o["ids"])
        samples += fresh
        if on_batch:
            on_batch(fresh)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / (time.time() - t0):.0f}")
    bar.close()
    model.train(was_training)
    order = {p["id"]: i for i, p in enumerate(problems)}
    samples.sort(key=lambda s: (order[s["id"]], s["sample"]))
    metrics = compute_metrics(samples, n)
    metrics["gen_tokens_per_s"] = new_tokens / max(time.time() - t0, 1e-9)
    if stats:
        metrics["logit_stats"] = stats.result()
    return metrics, samples


# ----------------------------------------------------------------------------- CLI
def load_model(path, dtype="auto"):
    """Causal LM + tokenizer: bf16 on CUDA, fp32 on CPU (CPUs without native bf16 run it several times slower)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if (path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1]) and not os.path.isdir(
            os.path.expanduser(path)):
        raise EvalError(f"model path does not exist: {path}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[dtype]
    local = os.path.expanduser(path)
    if os.path.isdir(local) and not os.path.isfile(os.path.join(local, "config.json")):
        found = sorted(d for d in os.listdir(local) if os.path.isfile(os.path.join(local, d, "config.json")))
        raise EvalError(f"{path} is a folder without config.json, not a model" +
                        (f"; checkpoints inside: {', '.join(found)}" if found else ""))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot load model {path!r}: {str(e).splitlines()[0][:300]}") from None
    if tokenizer.pad_token_id is None:  # batching needs a pad id; eos is safe because masks exclude padding
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_fingerprint(path):
    """Sizes and mtimes of a local model's weight/config files (a hub id stands for itself): a checkpoint rewritten
    at the same path must not resume from samples of the old weights."""
    local = os.path.expanduser(path)
    if not os.path.isdir(local):
        return path
    files = sorted(f for f in os.listdir(local) if f.endswith((".safetensors", ".bin", ".json")))
    stats = [(f, os.path.getsize(os.path.join(local, f)), os.path.getmtime(os.path.join(local, f))) for f in files]
    return f"{zlib.crc32(repr(stats).encode()):08x}"


def package_versions():
    from importlib.metadata import PackageNotFoundError
    out = {}
    for p in ("torch", "transformers", "datasets", "math-verify", "tqdm"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:  # e.g. a GPU box with only torch + transformers: record, don't crash
            out[p] = None
    return out


def write_json_atomic(path, obj):
    """Write to a temp file then rename: a crash never leaves a half-written file behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_samples(path):
    """Finished samples of an interrupted run; a line cut by a crash is dropped (its batch is regenerated)."""
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    s = json.loads(line)
                    done[(s["benchmark"], s["id"], s["sample"])] = s
                except (ValueError, KeyError):
                    pass
    return done


def markdown_table(results):
    cols = [c for c in next(iter(results.values())) if c.startswith(("pass@", "maj@"))]
    cols += ["format_rate", "mean_length"]
    lines = ["| benchmark | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.1f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a model on math benchmarks (Qwen2.5-Math protocol).")
    # model and data
    parser.add_argument("--model", required=True, help="hub id or local folder of a causal LM")
    parser.add_argument("--benchmarks", default="math500", help=f"comma list of {', '.join(BENCHMARKS)}")
    parser.add_argument("--data", default=None, help="comma list of local .json/.jsonl/.parquet files (overrides "
                        "--benchmarks; each is named by its file stem)")
    parser.add_argument("--data-dir", default=os.environ.get("EM_DATA_DIR"), help="folder with local copies of "
                        "the benchmark files (e.g. ../shared/benchmarks); default $EM_DATA_DIR, else the Hub")
    parser.add_argument("--problem-key", default=None, help=f"problem column (default: first of {PROBLEM_KEYS})")
    parser.add_argument("--answer-key", default=None, help=f"answer column (default: first of {ANSWER_KEYS})")
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    # protocol
    parser.add_argument("--template", default="qwen-math", choices=list(TEMPLATES), help="prompt protocol")
    parser.add_argument("--max-new-tokens", type=int, default=3072, help="generation budget per response")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the papers' headline protocol)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--n", type=int, default=1, help="samples per problem (pass@1 is their mean)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (the skewness analysis of "
                        "One-shot EM sampled with transformers' default top-k 50)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--answer-fallback", action="store_true", help="when there is no \\boxed{}, grade \"the "
                        "answer is X\" or else the last number (the Qwen2.5-Math harness's fallbacks)")
    parser.add_argument("--logit-stats", action="store_true", help="record logit skewness and entropy over "
                        "generated tokens (One-shot EM's logit-shift analysis) into results.json")
    # system
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    parser.add_argument("--engine", default="auto", choices=list(ENGINES), help="continuous batching (transformers) "
                        "or static (one generate call per batch); auto: continuous on a GPU wherever it runs the "
                        "request exactly, else static (printed)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto: bf16 on "
                        "CUDA, fp32 on CPU")
    parser.add_argument("--out", default=None, help="output folder (default eval_out/<model name>); a rerun with "
                        "the same arguments resumes")
    parser.add_argument("--overwrite", action="store_true", help="discard samples of an earlier run in --out")
    args = parser.parse_args(argv)
    try:
        run(args)
    except EvalError as e:
        sys.exit(f"error: {e}")


def run(args):
    if args.n < 1 or args.max_new_tokens < 1 or args.batch_size < 1 or not 0 < args.top_p <= 1:
        raise EvalError("--n, --max-new-tokens and --batch-size must be >= 1 and --top-p in (0, 1]")
    sources = args.data.split(",") if args.data else args.benchmarks.split(",")
    data = {}
    for src in sources:
        name = os.path.splitext(os.path.basename(src))[0] if args.data else src
        data[name] = load_benchmark(src, args.data_dir, args.problem_key, args.answer_key, limit=args.limit)
    out = args.out or os.path.join("eval_out", os.path.basename(args.model.rstrip("/")))
    os.makedirs(out, exist_ok=True)
    protocol = {"model": args.model, "model_files": model_fingerprint(args.model), "template": args.template,
                "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "n": args.n,
                "logit_stats": args.logit_stats, "engine": args.engine,
                "answer_fallback": args.answer_fallback, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "batch_size": args.batch_size, "benchmarks": {k: len(v) for k, v in data.items()},
                "sources": sources, "data_dir": args.data_dir, "dtype": args.dtype}
    run_file, samples_file = os.path.join(out, "run.json"), os.path.join(out, "samples.jsonl")
    done = {} if args.overwrite else read_samples(samples_file)
    if done and args.logit_stats:  # the statistics are accumulated while generating: reused samples have none
        print(f"--logit-stats: regenerating the {len(done)} samples already in {samples_file}")
        done = {}
    if done and os.path.exists(run_file):
        with open(run_file) as f:
            old = json.load(f)
        diff = [k for k in protocol if old.get(k) != protocol[k]]
        if diff:
            raise EvalError(f"{out} holds samples of a different run (differs in {', '.join(diff)}); use another "
                            "--out or --overwrite")
    write_json_atomic(run_file, protocol)
    if done:
        print(f"resuming: {len(done)} finished samples in {samples_file}")
    model, tokenizer = load_model(args.model, args.dtype)
    # Rewrite the kept samples (drops a line cut by a crash) before appending new batches.
    with open(samples_file + ".tmp", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in done.values())
    os.replace(samples_file + ".tmp", samples_file)
    sink = open(samples_file, "a")

    def append(batch):
        sink.writelines(json.dumps(s) + "\n" for s in batch)
        sink.flush()
        os.fsync(sink.fileno())

    results, all_samples, t0 = {}, [], time.time()
    for name, problems in data.items():
        bench_done = {(k[1], k[2]): s for k, s in done.items() if k[0] == name}
        results[name], samples = evaluate_model(
            model, tokenizer, problems, args.template, args.max_new_tokens, args.temperature, args.top_p, args.n,
            args.batch_size, args.seed, name=name, done=bench_done, on_batch=append, top_k=args.top_k,
            logit_stats=args.logit_stats, answer_fallback=args.answer_fallback, engine=args.engine)
        all_samples += samples
        if results[name]["grading_errors"]:
            print(f"{name}: {results[name]['grading_errors']} answers hit the grader's time limit or crashed it "
                  "(counted wrong)")
    sink.close()
    if args.logit_stats:
        for name, r in results.items():
            ls = r["logit_stats"]
            print(f"{name}: logit skewness (full vocab, mean over tokens) {ls['skew_vocab']:.3f}, pooled top-"
                  f"{ls['skew_topk_k']} at T={ls['skew_topk_temperature']} {ls['skew_topk_pooled']:.3f}, "
                  f"entropy {ls['entropy']:.3f} over {ls['tokens']} tokens")
        if plot_logit_stats(results, os.path.join(out, "logit_stats.png")):
            print(f"wrote {out}/logit_stats.png")
    if len(results) > 1:
        keys = [k for k in results[next(iter(results))] if k.startswith(("pass@", "maj@", "format", "mean_length"))]
        results["average"] = {k: sum(r[k] for r in results.values()) / len(results) for k in keys}
    with open(samples_file + ".tmp", "w") as f:  # final file: exactly one line per (benchmark, id, sample)
        f.writelines(json.dumps(s) + "\n" for s in all_samples)
    os.replace(samples_file + ".tmp", samples_file)
    write_json_atomic(os.path.join(out, "results.json"), {
        "metrics": results, "protocol": {**protocol, "system_prompt": TEMPLATES[args.template][0],
                                         "user_template": TEMPLATES[args.template][1]},
        "versions": package_versions(), "device": torch.cuda.get_device_name() if torch.cuda.is_available()
        else "cpu", "wall_s": time.time() - t0, "args": vars(args)})
    print(markdown_table(results))
    print(f"wrote {out}/results.json and {out}/samples.jsonl")


if __name__ == "__main__":
    main()
