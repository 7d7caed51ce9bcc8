"""Build a tiny random Qwen2-style model and a BPE tokenizer, fully offline.

Every test and every CPU smoke command in the docstrings uses this:

    python tests/tiny_model.py /tmp/tiny          # writes a Hugging Face model folder (~1 MB)
    python evaluate.py --model /tmp/tiny --data tests/data/math500.jsonl --limit 20

The tokenizer is a byte-level BPE trained here with `tokenizers` (so any text encodes, no <unk>), wrapped as
`PreTrainedTokenizerFast` with a Qwen-style chat template, `<|im_end|>` as eos and `<|endoftext|>` as pad, the
same special-token layout as Qwen2.5. The weights are random: outputs are gibberish, but shapes, masks, caching,
padding and gradients behave exactly as in a real model, which is what the tests check.
"""
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


# Random-weight shapes for the benchmarks (bench/): Qwen2.5-Math-1.5B and -7B exactly, and the tiny test model.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, rope_theta=10000.0,
                 tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096, rope_theta=10000.0,
               tie_word_embeddings=False),
}


def build_tokenizer(vocab_size=512):
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
    tok.train_from_iterator(CORPUS, trainer=trainer)
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


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["--untied"]):
        sys.exit("usage: python tests/tiny_model.py OUT_DIR [--untied]")
    print(build_tiny_model(sys.argv[1], tied=len(sys.argv) == 2))
