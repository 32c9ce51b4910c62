import { mount } from 'svelte';
import './app.css';
import App from './App.svelte';
import { setTransport } from './lib/api';

async function boot() {
  // Inside Tauri the real shell answers; in a plain browser (npm run dev / preview) the fake does.
  const w = window as unknown as { __TAURI_INTERNALS__?: unknown };
  if (!w.__TAURI_INTERNALS__) {
    const { createFakeBackend } = await import('./lib/api/fake');
    const params = new URLSearchParams(location.search);
    // A trained router exists (plan `router`, and `auto` picks it) unless ?norouter.
    const fake = createFakeBackend({ ready: !params.has('firstrun'), delayMs: 35, loadMs: 1500, router: !params.has('norouter') });
    setTransport(fake.invoke, fake.channel);
    console.info('RAMoLE UI: no Tauri runtime, using the in-memory fake backend');
  }
  mount(App, { target: document.getElementById('app')! });
}

void boot();
