import os

# CarRacing draws with pygame; tests run headless.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
