"""A small draft model drafting for a larger one of the same tokenizer: the same tokens as plain greedy
`generate`, with fewer forwards of the large model (MAT: mean accepted tokens per target forward, from
`handle.stats`).

    python examples/draft_model_generate.py                     # tiny random models built from configs, offline
    python examples/draft_model_generate.py --target ./Qwen2.5-Coder-1.5B-Instruct --draft ./Qwen2.5-Coder-0.5B-Instruct

Offline, the target is a random 4-layer Llama shaped like a trained one (a peaked head; layers 2-4 refine the
first layer's guess rather than overturn it) and the draft a 1-layer model made of the target's embeddings,
first layer, final norm and head, so that its guesses often agree with the target's, as a small sibling's do.
Folders are loaded with from_pretrained (never running repository code), their tokenizers compared.
"""
import argparse
import copy

import torch
import transformers

import hfpatch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--target", help="folder (or Hub id) of the large model")
parser.add_argument("--draft", help="folder (or Hub id) of the small model sharing its tokenizer")
parser.add_argument("--recipe", default="dyspec", choices=["draft-model", "dyspec", "rasd"])
parser.add_argument("--prompt", default="def fibonacci(n):\n    ")
parser.add_argument("--max-new-tokens", type=int, default=48)
args = parser.parse_args()
if bool(args.target) != bool(args.draft):
    parser.error("give both --target and --draft (or neither, for the tiny offline pair)")

tok, tokenizers = None, {}
if args.target and args.draft:
    target, draft = (transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
                     for p in (args.target, args.draft))
    tok = transformers.AutoTokenizer.from_pretrained(args.target)
    tokenizers = dict(target_tokenizer=tok, draft_tokenizer=transformers.AutoTokenizer.from_pretrained(args.draft))
    input_ids = tok(args.prompt, return_tensors="pt").input_ids
else:
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    target = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(30.0)
        for layer in target.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(0.1)
            layer.mlp.down_proj.weight.mul_(0.1)
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    draft = transformers.LlamaForCausalLM(small).eval()
    draft.load_state_dict(target.state_dict(), strict=False)  # the target's layers 1-3 have no place in the draft
    input_ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(1))

plain = target.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
with hfpatch.patch(target, args.recipe, draft_model=draft, **tokenizers) as handle:
    fast = target.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    stats = handle.stats["draft_model"]
drafter = stats["drafters"]["draft_model"]
if tok is not None:
    print(tok.decode(fast[0, input_ids.shape[1]:]))
print("identical to plain greedy:", torch.equal(plain, fast))
print(f"MAT (tokens per target forward): {stats['mean_accepted_tokens_per_forward']:.2f} "
      f"({stats['new_tokens']} tokens in {stats['forwards']} forwards)")
print(f"draft acceptance rate: {drafter['acceptance_rate']:.2f} "
      f"({drafter['accepted_tokens']} of {drafter['drafted_tokens']} drafted tokens)")
