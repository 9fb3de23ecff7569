//! The OpenRouter chat-completions image client, and the local stand-in server that imitates it.
