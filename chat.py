"""Chat with a BayLing model (or the embedded demo model) in the terminal."""
from bayling.chat.__main__ import run

if __name__ == "__main__":
    run()
