"""The Gradio desktop app: chat, models, convert, fine-tune."""
