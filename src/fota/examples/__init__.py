"""Example device apps shipped with fota (used by the demo and the tests)."""
from pathlib import Path

HELLO = Path(__file__).resolve().parent / "hello"


def hello_files(version: str, *, broken: bool = False) -> dict[str, bytes]:
    """The hello app at `version`; broken=True makes start() raise (a failing health check)."""
    text = (HELLO / "app.py").read_text().replace('VERSION = "1.0.0"', f'VERSION = "{version}"')
    if broken:
        text = text.replace("BROKEN = False", "BROKEN = True")
    return {"app.py": text.encode()}


POLL_APP = Path(__file__).resolve().parent / "poll_app"
ASYNCIO_APP = Path(__file__).resolve().parent / "asyncio_app"


def example_app_files(name: str, version: str) -> dict[str, bytes]:
    """An example app ("poll_app", "asyncio_app") at `version` (docs/boards.md)."""
    text = (Path(__file__).resolve().parent / name / "app.py").read_text()
    return {"app.py": text.replace('VERSION = "1.0.0"', f'VERSION = "{version}"').encode()}
