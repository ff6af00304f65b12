"""Example device apps shipped with fota (used by the demo and the tests)."""
from pathlib import Path

HELLO = Path(__file__).resolve().parent / "hello"


def hello_files(version: str, *, broken: bool = False) -> dict[str, bytes]:
    """The hello app at `version`; broken=True makes start() raise (a failing health check)."""
    text = (HELLO / "app.py").read_text().replace('VERSION = "1.0.0"', f'VERSION = "{version}"')
    if broken:
        text = text.replace("BROKEN = False", "BROKEN = True")
    return {"app.py": text.encode()}
