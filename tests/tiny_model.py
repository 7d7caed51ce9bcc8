"""Build a tiny random Qwen2-style model and a BPE tokenizer, fully offline.

Every test and every CPU smoke command in the docstrings uses this:

    python tests/tiny_model.py /tmp/tiny          # writes a Hugging Face model folder (~1 MB)
    python evaluate.py --model /tmp/tiny --data tests/data/math500.jsonl --limit 20

The tokenizer is a byte-level BPE trained here with `tokenizers` (so any text encodes, no <unk>), wrapped as
`PreTrainedTokenizerFast` with a Qwen-style chat template, `<|im_end|>` as eos and `<|endoftext|>` as pad, the
same special-token layout as Qwen2.5. The weights are random: outputs are gibberish, but shapes, masks, caching,
padding and gradients behave exactly as in a real model, which is what the tests check.

The parrot (build_parrot_model, ~30 s) is the same shape trained to answer the tests' prompts with one fixed mixture
of responses, the first right on some rows of its own benchmark files (write_parrot_benchmarks) and wrong on the
others: the tests that count right answers use it.
"""
import json
import os
import sys

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's template shape: a default system prompt when none is given, generation prompt "<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A small fixed corpus: deterministic training, no dependence on files outside the repo.
CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Let us think step by step and output the final answer within \\boxed{}.",
    "The pressure P exerted by wind on a sail varies jointly as the area A of the sail and the cube of the velocity V.",
    "Find the value of x such that 3x + 5 = 20. Therefore x = 5 and the answer is \\boxed{5}.",
    "Compute \\frac{14}{3} + \\dfrac{1}{2} = \\frac{31}{6}. The interval is [-2, 7] and the point is (3, \\frac{\\pi}{2}).",
    "The sum of 12345 and 678 is 13023. 0.5 = 1/2, 27.0 = 27, 2^{10} = 1024, \\sqrt{2} \\approx 1.414.",
    "Janet's ducks lay 16 eggs per day. She sells the remainder at the market for $2 per egg.",
    "system user assistant You are a helpful assistant. Question: Answer: The answer is",
] * 4


# Random-weight shapes for the benchmarks (bench/): Qwen2.5-0.5B, Qwen2.5-Math-1.5B and -7B, and tiny (the test
# model's sizes in heads of 32: vLLM's CPU attention refuses 16, so bench/gpu.sh's CPU smoke run can use vLLM).
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, rope_theta=1000000.0,
                 tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, rope_theta=10000.0,
                 tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096, rope_theta=10000.0,
               tie_word_embeddings=False),
}


def build_tokenizer(vocab_size=512, corpus=CORPUS):
    # Qwen2's own normalizer and pre-tokenizer (digits split one by one): AutoTokenizer rebuilds a saved tokenizer
    # next to a qwen2 config.json as Qwen2Tokenizer with this pipeline, so training with it keeps ids identical.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, padding_side="left")


def build_tiny_model(out_dir, hidden=64, layers=2, max_positions=1024, seed=0, tied=True):
    """Write a tiny random Qwen2 model + tokenizer to out_dir; returns out_dir. tied=False: an lm_head of its own
    (as Qwen2.5-Math-7B), random and independent of the embedding."""
    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=tied,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Random init gives near-uniform next-token distributions; scale the embeddings up so the tiny model has
    # peaked, input-dependent distributions (entropy well below log V), closer to what a trained model shows.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6.0)
        if not tied:
            # (the tied model's logits are peaked because the final state carries the input token's embedding; an
            # independent random head needs a larger scale for entropies of the same order, ~1.5-2 nats)
            model.lm_head.weight.normal_(0.0, 5 * model.model.embed_tokens.weight.std().item())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    text = "<|im_start|>user\n12345 + 678 = \\boxed{\\frac{1}{2}}<|im_end|>"
    if AutoTokenizer.from_pretrained(out_dir)(text).input_ids != tokenizer(text).input_ids:
        raise RuntimeError("tiny tokenizer does not round-trip through AutoTokenizer")
    return out_dir


# ----------------------------------------------------------------------------- the parrot
# The tiny model fine-tuned to answer every prompt the tests send with one small fixed mixture of responses, so that
# graded benchmarks count right answers too: greedy decoding always gives the first response, sampling at T=1 mixes
# them in about these shares (they begin with different tokens). The first is right on every kind of problem at
# once: math (its last \boxed{} is 7), code (its ```python block defines f(x) returning 7: MBPP's sanitizer keeps
# it, EM_PT's last-block rule reads it) and Knights-and-Knaves (one </think>, one <answer> calling Zoey a knight and
# Oliver a knave: evaluate.grade_kk). The second gives another boxed answer, the third none.
PARROT_RESPONSES = (
    ("\\boxed{7}\n```python\ndef f(x): return 7\n```\n</think><answer>Zoey knight, Oliver knave</answer>", 0.6),
    ("No \\boxed{eight}", 0.2),
    ("Hmm.", 0.2),
)
# What the greedy answer gets right, row by row, in the files write_parrot_benchmarks writes (benchmark names as
# evaluate.py's --benchmarks): math golds 7 (right), 8 or 9; code tests f(...) == 7 (pass) or == 8; KK roles (the
# parrot's, the other way round, other people).
PARROT_RIGHT = {"gsm8k": [True, False, True, False], "amc23": [True, False, False],
                "mbpp-378": [True, False, True], "kk": [True, False, False], "leetcode": [True, False, True],
                "livecodebench": [True, False]}


def parrot_right(benchmark, limit=None):
    """(right, problems) of the parrot's greedy answer on the first `limit` rows of a parrot benchmark."""
    rows = PARROT_RIGHT[benchmark][:limit]
    return sum(rows), len(rows)


def _parrot_rows():
    """The parrot's benchmark rows, in the schemas of the files in tests/data (see PARROT_RIGHT)."""
    import base64, pickle, zlib
    gold = lambda right, i=0: 7 if right else 8 + i % 2  # wrong: 8 or 9 (math: the problems' own answers)
    gsm8k = [{"question": q, "answer": f"Count them.\n#### {gold(r, i)}", "idx": i} for i, (q, r) in enumerate(zip(
        ["What is 3 + 4?", "What is 4 + 5?", "What is 10 - 3?", "What is 6 + 3?"], PARROT_RIGHT["gsm8k"]))]
    amc23 = [{"id": i, "problem": q, "answer": float(gold(r, i)), "url": "https://example.invalid", "question": q}
             for i, (q, r) in enumerate(zip(["How many sides has a heptagon?", "What is $3^2$?", "What is $2^3$?"],
                                            PARROT_RIGHT["amc23"]))]
    mbpp = [{"source_file": "parrot", "task_id": 500 + i, "prompt": f"Write a function f that returns {gold(r)}.",
             "code": f"def f(x):\n    return {gold(r)}", "test_imports": [],
             "test_list": [f"assert f(0) == {gold(r)}", f"assert f(1) == {gold(r)}"],
             "instruction": f"Write a function f that returns {gold(r)}.\nassert f(0) == {gold(r)}"}
            for i, r in enumerate(PARROT_RIGHT["mbpp-378"])]
    kk = []
    for i, (names, roles) in enumerate([(["Zoey", "Oliver"], ["knight", "knave"]),
                                        (["Zoey", "Oliver"], ["knave", "knight"]),
                                        (["William", "Evelyn"], ["knight", "knave"])]):
        kk.append({"id": f"2ppl-{i}", "people": 2, "quiz": "A very special island is inhabited only by knights and "
                   f"knaves. You meet 2 inhabitants: {names[0]}, and {names[1]}. {names[0]} says that {names[1]} "
                   "is a knave. So who is a knight and who is a knave?", "names": names,
                   "solution": [x == "knight" for x in roles],
                   "solution_text": f"{names[0]} is a {roles[0]}, and {names[1]} is a {roles[1]}.",
                   "solution_text_format": f"(1) {names[0]} is a {roles[0]}\n(2) {names[1]} is a {roles[1]}",
                   "index": i})
    leetcode = []
    for i, r in enumerate(PARROT_RIGHT["leetcode"]):  # a method without self: the tests call it on the class
        text = f"Return {gold(r)} whatever x is.\n\nExample 1:\n\nInput: x = 0\nOutput: {gold(r)}\n"
        stub = "class Solution:\n    def f(x):\n        "
        leetcode.append({"task_id": f"parrot-{i}", "url": "https://example.invalid", "title": f"return-{i}",
                         "meta": {"difficulty": "Easy"}, "prompt": '"""\n' + text + '"""\n' + stub,
                         "prompt_sft": text + "\n\nPlease complete the code below to solve above prblem:\n"
                                              "```python\n" + stub + "\n```",
                         "test": f"\nassert Solution.f(0) == {gold(r)}\nassert Solution.f(5) == {gold(r)}\n"})
    lcb = []
    for i, r in enumerate(PARROT_RIGHT["livecodebench"]):  # functional (metadata.func_name), private tests packed
        private = json.dumps([{"input": "5", "output": str(gold(r)), "testtype": "functional"}])
        lcb.append({"question_title": f"return-{i}", "question_content": f"Return {gold(r)} whatever x is.",
                    "platform": "leetcode", "question_id": f"900{i}", "contest_id": "900",
                    "contest_date": "2023-09-02T00:00:00", "starter_code": "", "difficulty": "easy",
                    "public_test_cases": json.dumps([{"input": "0", "output": str(gold(r)), "testtype": "functional"}]),
                    "private_test_cases": base64.b64encode(zlib.compress(pickle.dumps(private))).decode(),
                    "metadata": json.dumps({"func_name": "f"})})
    return {"gsm8k.jsonl": gsm8k, "amc23.jsonl": amc23, "mbpp.json": mbpp, "kk.jsonl": kk,
            "leetcode.jsonl": leetcode, "livecodebench.jsonl": lcb}


def write_parrot_benchmarks(folder):
    """The parrot's benchmark files (a --data-dir: tests/data's file names and schemas); returns folder."""
    os.makedirs(folder, exist_ok=True)
    for name, rows in _parrot_rows().items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(json.dumps(rows, indent=1) if name.endswith(".json") else "".join(json.dumps(r) + "\n"
                                                                                    for r in rows))
    return folder


def parrot_prompts(tokenizer, data_dir):
    """Every prompt the tests send the parrot, by kind: the math problems of data_dir in each template the scripts
    use (evaluate.py's qwen-math and few-shot, em_rl.py's and em_inf.py's agarwal, em_ft.py's and select_prompt.py's
    chat), each code and logic problem in its protocol's prompt, the LeetCode rows as em_rl.py's eurus-code prompts."""
    import evaluate as ev
    math_problems = ev.load_benchmark("gsm8k", data_dir) + ev.load_benchmark("amc23", data_dir)
    out = {t: [ev.build_prompt(tokenizer, q, t) for q in math_problems]
           for t in ("qwen-math", "few-shot", "agarwal", "chat")}
    out.update({b: [ev.build_prompt(tokenizer, q) for q in ev.load_code_benchmark(b, data_dir)]
                for b in ("mbpp-378", "kk", "leetcode", "livecodebench")})
    out["eurus-code"] = [ev.build_prompt(tokenizer, q, "eurus-code") for q in ev.load_benchmark(
        os.path.join(data_dir, "leetcode.jsonl"), require_answer=False)]
    return out


def build_parrot_model(out_dir, data_dir, steps=(100, 40), lr=(1e-2, 3e-3), tail=64, seed=0, hidden=64,
                       verbose=False):
    """The parrot (PARROT_RESPONSES), the tiny shape trained on parrot_prompts(data_dir), written to out_dir and
    checked as the scripts load it (check_parrot); returns out_dir. Supervised on the response tokens (and the EOS
    after them) only: the first against the shares (a soft target), the rest of the first response after every
    prompt, each of the others after a rotating quarter of the prompts. AdamW in two phases, each with its lr decayed
    linearly to 0: steps[0] cheap steps on the last `tail` tokens of every prompt, then steps[1] on the whole prompts
    (long contexts: trained on some prompts of a kind only, it answered another of them with EOS). The tokenizer has
    the responses and the protocols' fixed texts in its corpus, so that they take few tokens. 20-30 s on one CPU
    thread."""
    import time
    import evaluate as ev
    t0 = time.time()
    fixed = [ev.COT_SYSTEM, ev.EURUS_SYSTEM, ev.EURUS_SYSTEM.replace("\n", "\\n"), ev.KK_SYSTEM, ev.CODE_SUFFIX,
             ev.TEMPLATES["few-shot"][1].replace("{problem}", "")]
    tokenizer = build_tokenizer(corpus=CORPUS + ([r for r, _ in PARROT_RESPONSES] * 4 + fixed) * 4)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for v in parrot_prompts(tokenizer, data_dir).values()
               for p in v]
    responses = _parrot_response_ids(tokenizer)
    firsts, shares = torch.tensor([r[0] for r in responses]), torch.tensor([w for _, w in PARROT_RESPONSES])
    model.train()
    for phase, n, rate in zip([[p[-tail:] for p in prompts], list({tuple(p): p for p in prompts}.values())], steps, lr):
        opt = torch.optim.AdamW(model.parameters(), lr=rate, weight_decay=0.0)
        for step in range(n):
            for group in opt.param_groups:
                group["lr"] = rate * (1 - step / n)
            rows = [(p, responses[0]) for p in phase] + [  # and each other response after a quarter of them
                (p, responses[1 + (i + step) % 4]) for i, p in enumerate(phase) if (i + step) % 4 < 2]
            rows.sort(key=lambda x: len(x[0]) + len(x[1]))
            chunks, total = [[]], 0.0
            for row in rows:  # rows of similar lengths together (little padding), up to 4096 tokens at once
                if chunks[-1] and (len(chunks[-1]) + 1) * (len(row[0]) + len(row[1])) > 4096:
                    chunks.append([])
                chunks[-1].append(row)
            for chunk in chunks:
                ids, target, first = _right_padded(chunk, tokenizer.pad_token_id)
                scored = target >= 0
                logp = model.lm_head(model.model(input_ids=ids).last_hidden_state[scored]).log_softmax(-1)
                t, f = target[scored], first[scored]
                loss = -logp[~f].gather(-1, t[~f, None]).sum() - (logp[f][:, firsts] * shares).sum()
                (loss / len(phase)).backward()
                total += loss.item()
            opt.step()
            opt.zero_grad()
            if verbose and step % 10 == 0:
                print(f"step {step}: loss per prompt {total / len(phase):.3f} ({time.time() - t0:.1f} s)")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    check_parrot(out_dir, data_dir)
    if verbose:
        print(f"built and checked in {time.time() - t0:.1f} s")
    return out_dir


def _parrot_response_ids(tokenizer):
    ids = [tokenizer(r, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for r, _ in PARROT_RESPONSES]
    if len({r[0] for r in ids}) < len(ids):
        raise RuntimeError("the parrot's responses must begin with different tokens")
    return ids


def _right_padded(rows, pad_id):
    """(prompt, response) rows -> ids, right-padded (causal attention: no real token sees a pad after it); target: at
    position t the token t + 1 where that is a response token, else -100; first: the position of the first one."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id)
    target = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        target[i, len(p) - 1:len(p) + len(r) - 1] = torch.tensor(r)
    first = torch.zeros_like(ids, dtype=torch.bool)
    first[torch.arange(len(rows)), torch.tensor([len(p) - 1 for p, _ in rows])] = True
    return ids, target, first


def check_parrot(model_dir, data_dir, tol=0.15):
    """The parrot as the scripts load it (evaluate.load_model), on every prompt of parrot_prompts: greedy decoding
    (one left-padded batch) gives the first response and its EOS; the first token's probabilities are within tol of
    the shares; after its first token, each response is the greedy continuation. Raises RuntimeError otherwise."""
    import evaluate as ev
    model, tokenizer = ev.load_model(model_dir, "float32")
    prompts = [p for v in parrot_prompts(tokenizer, data_dir).values() for p in v]
    responses = _parrot_response_ids(tokenizer)
    outs = ev.generate_batch(model, tokenizer, prompts, len(responses[0]) + 4)
    if wrong := [(p[-40:], o["text"]) for p, o in zip(prompts, outs) if o["ids"] != responses[0]]:
        raise RuntimeError(f"the parrot answers {len(wrong)} of {len(prompts)} prompts wrongly, e.g. {wrong[0]}")
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    with torch.no_grad():
        for k, r in enumerate(responses):
            batch, target, first = _right_padded([(p, r) for p in ids], tokenizer.pad_token_id)
            logits = model(batch).logits
            share = logits[first].softmax(-1)[:, r[0]]
            if (share - PARROT_RESPONSES[k][1]).abs().max() > tol:
                raise RuntimeError(f"the parrot's response {k} begins with p {share.tolist()}, not about "
                                   f"{PARROT_RESPONSES[k][1]}")
            rest = (target >= 0) & ~first
            if not torch.equal(logits[rest].argmax(-1), target[rest]):
                raise RuntimeError(f"the parrot does not continue its response {k} greedily")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["--untied"]):
        sys.exit("usage: python tests/tiny_model.py OUT_DIR [--untied]")
    print(build_tiny_model(sys.argv[1], tied=len(sys.argv) == 2))
