"""The server's processes and what they say to each other: the tokenizer manager (in the
HTTP process), the scheduler process per TP rank, the detokenizer process, the typed ZMQ
messages (io_struct) and the ipc:// sockets."""
