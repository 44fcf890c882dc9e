"""The README's first call: any OpenAI client, pointed at Bastion by two environment variables.

python3 -m venv .venv-app && .venv-app/bin/pip install openai
OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=bst-… .venv-app/bin/python examples/hello.py
"""

from openai import OpenAI

client = OpenAI()  # reads OPENAI_BASE_URL / OPENAI_API_KEY: no code change for existing apps
for chunk in client.chat.completions.create(
    model="tiny", messages=[{"role": "user", "content": "Hello"}], stream=True
):
    print(chunk.choices[0].delta.content or "", end="")
print()
print(client.embeddings.create(model="minilm", input="card blocked abroad").data[0].embedding[:4])
