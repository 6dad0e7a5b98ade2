"""`wb chat`: multi-turn chat with a model (and an adapter, unmerged) in the terminal or for scripts.

`workbench.chat.run.chat` is the command; `workbench.chat.session.ChatSession` the conversation.
Nothing heavy is imported here: `wb --help` stays quick.
"""
