"""The released defaults, as literal tables: what each CLI runs with when only the required flags are given (its
argparse defaults, after em_ft.py's recipe fills the rest), captured at the point main() hands them to the work. A
changed default fails here, on purpose: the recipes and the release's values are the claims of the docstrings and
the README (One-shot EM: Gao et al.'s released code; EM-RL: Agarwal et al.'s verl scripts; EM-INF: their script)."""
import pytest

import em_ft
import em_inf
import em_rl
import evaluate as ev
import select_prompt

ONE_SHOT = {  # Gao et al.'s released recipe: pi_1, 64 rollouts x 512 tokens, T 0.5 / top-p 0.95 / penalty 1.15, loss
    # temperature 0.5, token mean, lr 2e-5, their step_10 on 8 GPUs = 2 updates, seed 15
    "template": "chat", "batch_size": 64, "max_new_tokens": 512, "temperature": 0.5, "top_p": 0.95,
    "repetition_penalty": 1.15, "loss_temperature": 0.5, "loss_norm": "token-mean", "lr": 2e-5, "max_steps": 2,
    "eval_template": "qwen-math"}
EM_FT = {  # Agarwal et al.'s EM-FT: 512 prompts x 1 sample, 3072 new tokens, no loss temperature, sum over a response
    "template": "agarwal", "batch_size": 512, "max_new_tokens": 3072, "temperature": 1.0, "top_p": 1.0,
    "repetition_penalty": 1.0, "loss_temperature": 1.0, "loss_norm": "trajectory-sum", "lr": 1e-6, "max_steps": 40,
    "eval_template": "agarwal"}
EM_FT_COMMON = {
    "model": "M", "data": None, "problem_key": None, "rollout_batch_size": 64, "engine": "auto", "entropy_chunk": 1024,
    "rollout_engine": "static", "rollout_gpu_memory": 0.3,
    "weight_decay": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "grad_clip": 1.0, "micro_batch_size": 8, "seed": 15,
    "eval_every": 0, "eval_benchmark": "math500", "eval_limit": 100, "eval_max_new_tokens": 3072, "data_dir": None,
    "stop_entropy": None, "stop_entropy_drop": None, "out": "em_ft_out", "log_rollouts": False, "save_steps": [],
    "offload_optimizer": None, "gradient_checkpointing": None, "allow_code_execution": False, "code_workers": None, "dist_timeout": 3600}
EM_RL = {  # verl as released (the published numbers): token-entropy reward, length-normalized, RLOO, PPO-clip 0.2 with
    # 4 mini-batches, k3 KL 0.001 and entropy bonus 0.001, per-micro-batch token means of 8 per GPU, 512 prompts x 4
    # responses x 3072 tokens, prompts over 1024 tokens dropped, lr 1e-6, one epoch
    "model": "M", "data": "D", "problem_key": None, "answer_key": None, "limit": None, "max_prompt_length": 1024,
    "template": "agarwal", "eval_template": None, "batch_size": 512, "n_rollouts": 4, "max_new_tokens": 3072, "temperature": 1.0,
    "rollout_batch_size": 64, "engine": "auto", "rollout_engine": "static", "rollout_gpu_memory": 0.3, "reward": "token", "reward_agg": "mean", "baseline": "rloo",
    "update": "ppo-clip", "loss_agg": "micro-token-mean", "clip_ratio": 0.2, "ppo_minibatches": 4, "kl_coef": 0.001,
    "entropy_bonus": 0.001, "lr": 1e-6, "weight_decay": 0.01, "grad_clip": 1.0, "steps": None, "micro_batch_size": 8,
    "logit_chunk": 1024, "seed": 0, "gradient_checkpointing": None, "offload_optimizer": None,
    "out": "checkpoints/em_rl", "save_steps": [], "log_rollouts": False, "eval_every": 0, "eval_benchmark": "math500",
    "eval_limit": 100, "eval_max_new_tokens": 3072, "data_dir": None, "allow_code_execution": False,
    "code_workers": None, "dist_timeout": 3600}
EM_INF = {  # the released script: 3 Adam steps, lr 0.1, threshold 0.3, KL weight 0.05, 4096 tokens (T 0.1 after the
    # update: --temperature None resolves to it); adaptive temperature: ratio 0.85, tau in [0.01, 1]; Table 3's five
    "model": "M", "benchmarks": "math500,aimo-amc,aimo-aime,minerva,olympiadbench", "data_dir": None, "limit": None,
    "template": "agarwal", "mode": "em-inf", "compare_plain": False, "n_steps": 3, "lr": 0.1, "threshold": 0.3,
    "kl_weight": 0.05, "target_ratio": 0.85, "tmin": 0.01, "tmax": 1.0, "tol": 0.1, "max_iter": 100,
    "at_threshold": 1e-5, "temperature": None, "sampling_config": "model", "top_k": None, "top_p": None,
    "repetition_penalty": None, "max_new_tokens": 4096, "n": 1, "seed": 0, "answer_fallback": False, "batch_size": 64,
    "engine": "auto", "dtype": None, "compile": False, "out": None, "allow_code_execution": False,
    "code_workers": None, "dist_timeout": 3600}
SELECT = {  # One-shot EM's rule p(1-p) over k = 16 samples at One-Shot RLVR's T 0.6, em_ft's training format
    "model": "M", "data": "D", "data_dir": None, "problem_key": None, "answer_key": None, "limit": None,
    "strip_suffix": True, "score": "variance", "k": 16, "entropy_temperature": 1.0, "template": "chat",
    "temperature": 0.6, "top_p": 1.0, "max_new_tokens": 1024, "seed": 0, "out": "prompt.jsonl", "top": 1,
    "keep_samples": 2, "batch_size": 64, "engine": "auto", "dtype": None, "overwrite": False,
    "allow_code_execution": False, "code_workers": None, "dist_timeout": 172800}
EVALUATE = {  # both papers' headline protocol: the Qwen2.5-Math CoT prompt, zero-shot, greedy, 3072 new tokens
    "model": "M", "benchmarks": "math500", "data": None, "data_dir": None, "problem_key": None, "answer_key": None,
    "limit": None, "template": "qwen-math", "max_new_tokens": 3072, "temperature": 0.0, "top_p": 1.0, "n": 1,
    "top_k": 0, "seed": 0, "answer_fallback": False, "logit_stats": False, "batch_size": 64, "engine": "auto",
    "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "dtype": None, "out": None, "overwrite": False, "grade": None, "allow_code_execution": False,
    "code_workers": None, "code_memory_mb": 4096, "code_timeout": None, "dist_timeout": 3600}


@pytest.fixture
def handed_over(monkeypatch):
    """main(argv) -> the arguments it hands to its work (cli_main replaced by a recorder: nothing runs)."""
    got = []
    monkeypatch.delenv("EM_DATA_DIR", raising=False)  # --data-dir's default (conftest takes it out anyway)
    monkeypatch.delenv("EM_ENGINE", raising=False)  # --engine's default (conftest sets static)
    monkeypatch.setattr(ev, "cli_main", lambda work, args, resumes: got.append(vars(args)))

    def run(main, *argv):
        got.clear()
        main(list(argv))
        return got[0]
    return run


def test_em_ft_recipes_are_the_released_ones(handed_over):
    assert em_ft.RECIPES == {"one-shot": ONE_SHOT, "em-ft": EM_FT}
    assert handed_over(em_ft.main, "--model", "M") == {"recipe": "one-shot", **ONE_SHOT, **EM_FT_COMMON}
    assert handed_over(em_ft.main, "--model", "M", "--recipe", "em-ft") == {"recipe": "em-ft", **EM_FT, **EM_FT_COMMON}
    # a flag given wins over the recipe, the rest stays the recipe's
    assert handed_over(em_ft.main, "--model", "M", "--lr", "1e-5", "--loss-norm", "micro-token-mean") == {
        "recipe": "one-shot", **ONE_SHOT, **EM_FT_COMMON, "lr": 1e-5, "loss_norm": "micro-token-mean"}


def test_em_rl_em_inf_select_evaluate_defaults(handed_over):
    assert handed_over(em_rl.main, "--model", "M", "--data", "D") == EM_RL
    assert handed_over(em_inf.main, "--model", "M") == EM_INF
    assert handed_over(select_prompt.main, "--model", "M", "--data", "D") == SELECT
    assert handed_over(ev.main, "--model", "M") == EVALUATE
