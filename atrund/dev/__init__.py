"""Development tools: the local PDS + PLC stack and the narrated demo."""
