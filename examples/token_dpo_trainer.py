"""Token-level DPO inside TRL's own DPOTrainer: hfpatch.patch(trainer, "cdpo") weights each rejected token by
a per-token column (`rejected_weights`) in TRL's DPO loss; train a few steps and print the logged metrics.

    python examples/token_dpo_trainer.py      # a tiny random Llama and six toy pairs: offline, seconds (needs trl)

The weights here are a toy rule (1.0 on a rejected token the chosen answer lacks, 0.3 otherwise); real ones come
from `hfpatch critical-tokens`, which scores how critical each token is to the wrong answer.
"""
import copy
import tempfile

import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from trl import DPOConfig, DPOTrainer

import hfpatch
from hfpatch.techniques.training.critical_tokens import encode_completion

words = "<pad> <s> </s> <unk> what is two plus three four five six seven the answer".split()
backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                           pad_token="<pad>", unk_token="<unk>")
pairs = [("what is two plus three ", "the answer is five", "the answer is six"),
         ("what is three plus four ", "the answer is seven", "the answer is six"),
         ("what is two plus two ", "the answer is four", "the answer is five"),
         ("what is four plus three ", "the answer is seven", "the answer is five six"),
         ("what is two plus four ", "the answer is six", "four"),
         ("what is three plus two ", "the answer is five", "the answer is four")] * 2
rows = []
for prompt, chosen, rejected in pairs:
    _, rejected_ids = encode_completion(tok, prompt, rejected)  # tokenised exactly as the DPOTrainer will
    wanted = set(tok(chosen)["input_ids"])
    rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                 "rejected_weights": [0.3 if t in wanted else 1.0 for t in rejected_ids]})

config = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config)
args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                 logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args,
                     train_dataset=Dataset.from_list(rows), processing_class=tok)

with hfpatch.patch(trainer, "cdpo") as handle:
    trainer.train()
    print("token_dpo stats:", {k: round(v, 4) if isinstance(v, float) else v
                               for k, v in handle.stats["token_dpo"].items()})
for entry in trainer.state.log_history:
    if "loss" in entry:
        print(f"step {entry['step']}: loss {entry['loss']:.4f}, "
              f"rewards/margins {entry.get('rewards/margins', float('nan')):.4f}")
print("unpatched: compute_loss is TRL's again:", "compute_loss" not in vars(trainer))
