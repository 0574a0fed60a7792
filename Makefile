.PHONY: run test bench fmt

run:  ## install what is missing, migrate, build the runtime, start everything
	bin/run

test:  ## lint, types, migrations check and the whole test suite
	bin/test

bench: export DEBUG ?= True
bench:
	.venv/bin/python bench/cold_start.py && .venv/bin/python bench/chat_relay.py && .venv/bin/python bench/ai_gateway.py && .venv/bin/python bench/backup.py && .venv/bin/python bench/wake.py && .venv/bin/python bench/user_cost.py && .venv/bin/python bench/thaw_path.py && .venv/bin/python bench/telegram.py && .venv/bin/python bench/browser.py

fmt:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .
