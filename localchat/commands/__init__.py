"""One module per `localchat` command, each with a plain function, a parser and `main`."""
