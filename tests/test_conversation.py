"""Conversations -> ids + labels: the learned tokens are exactly the replies and their end tokens."""

from __future__ import annotations

import pytest

from mmlm.data.conversation import IGNORE, TEMPLATES, ConversationError, encode_conversation, encode_prompt
from mmlm.data.shapes import ShapesDataset
from mmlm.tokenizer import Tokenizer

# SmolLM2's chat template (ChatML with a default system turn).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"]
IMAGE_ID, IMAGE_TOKENS = 2, 5


@pytest.fixture(scope="module")
def data():
    ds = ShapesDataset("train", size=300, seed=0, n_questions=3)
    multi = ShapesDataset("val", size=100, seed=1, n_questions=5)
    return [ds[i] for i in range(len(ds))] + [multi[i] for i in range(len(multi))]


@pytest.fixture(scope="module")
def tok(data):
    texts = [t["value"] for item in data[:100] for t in item["conversations"]] + [item["caption"] for item in data[:100]]
    return Tokenizer.train_byte_level(texts, vocab_size=400, special_tokens=SPECIAL, chat_template=CHATML)


def _turns(item, template):
    if template == "plain":
        return [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": item["caption"]}]
    return item["conversations"]


def _learned_spans(ids, labels):
    spans, cur = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE:
            assert label == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


@pytest.mark.parametrize("template", TEMPLATES)
def test_learned_tokens_decode_to_replies_plus_end_token(template, tok, data):
    end = "<|im_end|>" if template == "chat" else "</s>"
    n_multi = 0
    for k, item in enumerate(data):
        turns = _turns(item, template)
        enc = encode_conversation(turns, tok, template, IMAGE_ID, IMAGE_TOKENS, n_images=1, name=f"item {k}")
        replies = [t["value"] for t in turns if t["from"] == "gpt"]
        n_multi += len(replies) > 1
        spans = _learned_spans(enc.input_ids, enc.labels)
        assert [tok.decode(s) for s in spans] == [r + end for r in replies]
        assert enc.input_ids.count(IMAGE_ID) == IMAGE_TOKENS and enc.n_images == 1
        assert all(label == IGNORE for i, label in zip(enc.input_ids, enc.labels) if i == IMAGE_ID)
        if k < 50:  # the prompt for the first reply is the training prefix up to that reply
            prompt = encode_prompt(turns[:1], tok, template, IMAGE_ID, IMAGE_TOKENS)
            first = enc.labels.index(next(label for label in enc.labels if label != IGNORE))
            assert prompt == enc.input_ids[:first]
    assert template == "plain" or n_multi > 300


def test_rendered_text_of_chat_template(tok, data):
    turns = data[0]["conversations"][:2]
    enc = encode_conversation(turns, tok, "chat", IMAGE_ID, 1)
    text = tok.decode(enc.input_ids)
    assert text == tok.apply_chat_template([{"role": "user", "content": turns[0]["value"]},
                                            {"role": "assistant", "content": turns[1]["value"]}],
                                           add_generation_prompt=False)


def test_vicuna_layout(tok):
    turns = [{"from": "human", "value": "<image>\nWhat colour is the star?"}, {"from": "gpt", "value": "red"},
             {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "2"}]
    enc = encode_conversation(turns, tok, "vicuna_v1", IMAGE_ID, 1)
    assert tok.decode(enc.input_ids) == ("<s>A chat between a curious user and an artificial intelligence assistant. "
                                         "The assistant gives helpful, detailed, and polite answers to the user's "
                                         "questions. USER: <image>\nWhat colour is the star? ASSISTANT: red</s>"
                                         "USER: How many? ASSISTANT: 2</s>")


@pytest.mark.parametrize("turns, match", [
    ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}], "unknown role 'robot'"),
    ([{"from": "gpt", "value": "x"}], "alternate"),
    ([{"from": "human", "value": "<image> q"}], "must end with an assistant reply"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}], r"0 <image> placeholder\(s\) but the sample has 1"),
    ([{"from": "human", "value": "<image>" + " q" * 200}, {"from": "gpt", "value": "x"}], "more than the context of 64"),
])
def test_bad_samples_are_errors_naming_them(tok, turns, match):
    with pytest.raises(ConversationError, match="sample-7: .*" + match):
        encode_conversation(turns, tok, "vicuna_v1", IMAGE_ID, 1, max_len=64, n_images=1, name="sample-7")


def test_chat_template_without_closing_token_is_an_error(tok):
    bare = Tokenizer.train_byte_level(["a b c"], vocab_size=300, chat_template=
                                      "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    with pytest.raises(ConversationError, match="does not close an assistant reply"):
        encode_conversation([{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}], bare, "chat", 9, 1)
