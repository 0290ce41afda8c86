"""Redis: how to reach it (a URL or Sentinel), the channel layer, the Lua scripts."""
