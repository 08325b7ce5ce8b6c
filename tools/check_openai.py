#!/usr/bin/env python3
"""Checks a running `latent serve` with the official `openai` Python client.

    pip install openai
    latent serve --port 8000 &          # the demo model, or --model DIR
    python3 tools/check_openai.py --base-url http://127.0.0.1:8000/v1 [--api-key KEY]

Runs a chat completion, a text completion, a streamed chat with usage, and a request with an
invalid value, and checks what the client gets back. Exits non-zero on the first mismatch.
"""

import argparse
import sys

import openai


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)

    model = client.models.list().data[0].id
    print(f"model: {model}")

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Who created the heaven and the earth?"}],
        max_tokens=24,
        temperature=0,
    )
    reply = chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length"), chat
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    print(f"chat: {reply!r} ({chat.usage.completion_tokens} tokens)")

    text = client.completions.create(model=model, prompt="And God said", max_tokens=12, temperature=0, logprobs=2)
    assert len(text.choices[0].logprobs.tokens) == text.usage.completion_tokens
    print(f"completion: {text.choices[0].text!r}")

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Who created the heaven and the earth?"}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
    assert "".join(pieces) == reply, ("".join(pieces), reply)
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens
    print(f"stream: {len(pieces)} chunks, same text, usage {usage.completion_tokens} tokens")

    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], temperature=-1)
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "temperature", e.body
        print(f"error: 400, param {e.body['param']!r}: {e.body['message']}")
    else:
        sys.exit("a negative temperature was accepted")
    print("ok")


if __name__ == "__main__":
    main()
