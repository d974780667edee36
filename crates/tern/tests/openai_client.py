"""Talks to `tern serve` with the official `openai` package; prints the texts it got as JSON.

usage: openai_client.py BASE_URL API_KEY MODEL COMPLETION_PROMPT CHAT_PROMPT MAX_TOKENS
"""

import json
import sys

import openai

base_url, api_key, model, prompt, chat_prompt, max_tokens = sys.argv[1:7]
max_tokens = int(max_tokens)
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
out = {}

out["models"] = [m.id for m in client.models.list().data]

r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
out["completion"] = r.choices[0].text
out["completion_finish_reason"] = r.choices[0].finish_reason
out["completion_usage"] = r.usage.model_dump()

chunks = client.completions.create(
    model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
)
out["completion_stream"] = "".join(c.choices[0].text for c in chunks if c.choices)

messages = [{"role": "user", "content": chat_prompt}]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
out["chat"] = r.choices[0].message.content
out["chat_role"] = r.choices[0].message.role

chunks = client.chat.completions.create(
    model=model,
    messages=messages,
    max_completion_tokens=max_tokens,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
text, usage = "", None
for c in chunks:
    if c.usage is not None:
        usage = c.usage.model_dump()
    for choice in c.choices:
        text += choice.delta.content or ""
out["chat_stream"] = text
out["chat_stream_usage"] = usage

try:
    client.completions.create(model="no-such-model", prompt=prompt, max_tokens=1)
    out["unknown_model_error"] = None
except openai.NotFoundError as e:
    out["unknown_model_error"] = {"status": e.status_code, "code": e.code}

print(json.dumps(out))
