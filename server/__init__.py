"""The server: SGLang's process layout around the stage 1-4 engine (see server/README.md)."""
