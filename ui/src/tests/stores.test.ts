import { describe, it, expect, beforeEach, vi } from 'vitest';
import { setTransport } from '../lib/api';
import { createFakeBackend, type FakeBackend } from '../lib/api/fake';
import { DiscoverStore } from '../lib/stores/discover.svelte';
import { LibraryStore, TrainStore } from '../lib/stores/library.svelte';
import { ModelChoice } from '../lib/stores/setup.svelte';
import { errors } from '../lib/stores/errors.svelte';

let fake: FakeBackend;
beforeEach(() => {
  fake = createFakeBackend({ ready: true });
  setTransport(fake.invoke, fake.channel);
  errors.clear();
});

describe('discover store', () => {
  it('searches with null query when empty, and with the sort', async () => {
    const s = new DiscoverStore();
    s.sort = 'likes';
    await s.search();
    expect(fake.calls[0].args).toEqual({ request: { query: null, sort: 'likes', limit: 30 } });
    expect(s.results[0].repo).toBe('carol/llama3-8b-medical');
    s.query = ' legal ';
    await s.search();
    expect(s.results.map((r) => r.repo)).toEqual(['alice/smollm2-legal-lora']);
  });
  it('keeps a search error for inline display', async () => {
    const s = new DiscoverStore();
    s.query = 'error';
    await s.search();
    expect(s.error).toEqual({ code: 'hub', message: 'the Hub answered 503 Service Unavailable' });
    expect(s.searching).toBe(false);
  });
  it('installs with progress and marks the hit installed', async () => {
    const s = new DiscoverStore();
    await s.search();
    const hit = s.results.find((r) => r.repo === 'alice/smollm2-legal-lora')!;
    const seen: string[] = [];
    const orig = fake.channel;
    fake.channel = (on) => orig((e) => { seen.push((e as { stage: string }).stage); on(e as never); });
    setTransport(fake.invoke, fake.channel);
    let installed = false;
    const id = await s.install(hit, () => (installed = true));
    expect(id).toBe('smollm2-legal-lora');
    expect(installed).toBe(true);
    expect(seen).toContain('download');
    expect(seen.at(-1)).toBe('commit');
    expect(s.results.find((r) => r.repo === hit.repo)!.installed_as).toBe('smollm2-legal-lora');
    expect(s.installs[hit.repo]).toBeUndefined();
  });
  it('does not install incompatible hits and shows install errors inline', async () => {
    const s = new DiscoverStore();
    await s.search();
    const bad = s.results.find((r) => r.verdict === 'incompatible')!;
    expect(await s.install(bad)).toBeNull();
    expect(fake.calls.some((c) => c.cmd === 'adapter_install')).toBe(false);
    const gated = s.results.find((r) => r.gated)!;
    expect(await s.install(gated)).toBeNull();
    expect(s.installs[gated.repo].error?.code).toBe('hub');
    expect(s.installs[gated.repo].running).toBe(false);
  });
  it('cancels an install', async () => {
    const slow = createFakeBackend({ ready: true, delayMs: 5 });
    setTransport(slow.invoke, slow.channel);
    const s = new DiscoverStore();
    await s.search();
    const hit = s.results.find((r) => r.repo === 'alice/smollm2-legal-lora')!;
    const p = s.install(hit);
    await new Promise((r) => setTimeout(r, 12));
    expect(s.installs[hit.repo].running).toBe(true);
    await s.cancel(hit.repo);
    expect(await p).toBeNull();
    expect(s.installs[hit.repo]).toBeUndefined();
    expect(slow.state.adapters.some((a) => a.id === 'smollm2-legal-lora')).toBe(false);
  });
});

describe('library store', () => {
  it('loads, toggles, edits samples and removes', async () => {
    const lib = new LibraryStore();
    await lib.load();
    expect(lib.adapters.map((a) => a.id)).toEqual(['sql-lora', 'poetry-lora', 'math-lora']);
    await lib.setEnabled('sql-lora', false);
    expect(lib.adapters[0].enabled).toBe(false);
    expect(fake.state.adapters[0].enabled).toBe(false);
    await lib.select('poetry-lora');
    expect(lib.samples).toHaveLength(3);
    lib.setSample(0, '  Write a haiku  ');
    lib.addSample();
    lib.addSample();
    lib.setSample(4, 'A sonnet about rain');
    lib.removeSample(1);
    expect(lib.samplesDirty).toBe(true);
    expect(await lib.saveSamples()).toBe(true);
    const call = fake.calls.find((c) => c.cmd === 'adapter_set_samples')!;
    expect(call.args).toEqual({ id: 'poetry-lora', samples: ['Write a haiku', 'Explain poems and rhymes step by step', 'A sonnet about rain'] });
    expect(lib.samplesDirty).toBe(false);
    expect(lib.selected?.sample_list.every((s) => s.origin === 'user')).toBe(true);
    let changed = 0;
    lib.onChanged = () => changed++;
    expect(await lib.remove('poetry-lora')).toBe(true);
    expect(lib.selected).toBeNull();
    expect(changed).toBe(1);
    expect(await lib.remove('nope')).toBe(false);
    expect(errors.list.at(-1)?.code).toBe('not_found');
  });
  it('adds a local folder and reports errors inline', async () => {
    const lib = new LibraryStore();
    lib.addPath = 'relative/path';
    expect(await lib.addLocal()).toBeNull();
    expect(lib.addError?.code).toBe('not_found');
    lib.addPath = '/home/me/my-lora';
    lib.addName = 'Mine';
    const a = await lib.addLocal();
    expect(fake.calls.at(-1)!.args).toEqual({ request: { path: '/home/me/my-lora', name: 'Mine' } });
    expect(a?.name).toBe('Mine');
    expect(lib.addError).toBeNull();
    expect(lib.addPath).toBe('');
  });
});

describe('train store', () => {
  it('validates the form with line numbers', () => {
    const t = new TrainStore();
    t.form.examplesText = '{"input":"a","target":"b"}\noops';
    const errs = t.validate();
    expect(errs.map((e) => e.message)).toContain('give the adapter a name');
    expect(errs.find((e) => e.line === 2)?.message).toMatch(/not valid JSON/);
    t.form.name = 'style';
    t.form.examplesText = '{"input":"a","target":"b"}';
    t.form.rank = 0;
    expect(t.validate().map((e) => e.message)).toEqual(['rank must be a whole number in 1..256']);
  });
  it('trains with inline examples, recording the loss curve', async () => {
    const t = new TrainStore();
    t.form.name = 'my-style';
    t.form.examplesText = '{"input":"a","target":"b"}\n{"input":"c","target":"d"}';
    t.form.steps = 5;
    const a = await t.start();
    expect(a?.id).toBe('my-style');
    const req = fake.calls.find((c) => c.cmd === 'adapter_train')!.args!.request as Record<string, unknown>;
    expect(req.examples).toEqual([{ input: 'a', target: 'b' }, { input: 'c', target: 'd' }]);
    expect(req.examples_path).toBeNull();
    expect(t.losses.map((l) => l.step)).toEqual([1, 2, 3, 4, 5]);
    expect(t.progress?.step).toBe(5);
    expect(t.running).toBe(false);
  });
  it('sends a JSONL path and shows the error of a missing file', async () => {
    const t = new TrainStore();
    t.form.name = 'x';
    t.form.source = 'path';
    t.form.examplesPath = '/nope/file.txt';
    expect(await t.start()).toBeNull();
    expect(t.error?.code).toBe('not_found');
  });
});

describe('first run model choice', () => {
  it('downloads from the Hub, reports progress, and uses the path', async () => {
    const c = new ModelChoice('/suggested');
    expect(c.chosenPath).toBe('/suggested');
    c.mode = 'hub';
    expect(c.chosenPath).toBe('');
    c.repo = 'owner/model-GGUF';
    c.file = 'model-q8_0.gguf';
    const path = await c.pull();
    expect(path).toMatch(/model-q8_0\.gguf$/);
    expect(c.chosenPath).toBe(path);
    expect(fake.calls.at(-1)!.args!.request).toEqual({ repo: 'owner/model-GGUF', revision: null, file: 'model-q8_0.gguf' });
    expect(c.progress?.stage).toBe('validate');
    c.repo = 'bad';
    expect(await c.pull()).toBeNull();
    expect(c.error?.code).toBe('invalid');
  });
});

describe('app store', () => {
  it('reads settings only once a base model is set up', async () => {
    const { AppStore } = await import('../lib/stores/app.svelte');
    const { api } = await import('../lib/api');
    fake = createFakeBackend({ ready: false, loadMs: 0 });
    setTransport(fake.invoke, fake.channel);
    const a = new AppStore();
    await a.refresh();
    expect(a.status?.ready).toBe(false);
    expect(fake.calls.map((c) => c.cmd)).not.toContain('settings_get');
    expect(a.settings).toBeNull();
    await api.setupModels({ base_path: '/m/smollm2.gguf', embedder_path: '/m/minilm', base_id: null });
    await a.refresh();
    expect(fake.calls.map((c) => c.cmd)).toContain('settings_get');
    expect(a.settings).not.toBeNull();
  });

  it('follows the engine from loading to ready through app_watch, without polling', async () => {
    vi.useFakeTimers();
    try {
      const { AppStore } = await import('../lib/stores/app.svelte');
      fake = createFakeBackend({ ready: false, loadMs: 5000 });
      setTransport(fake.invoke, fake.channel);
      const count = (cmd: string) => fake.calls.filter((c) => c.cmd === cmd).length;
      const a = new AppStore();
      await a.watch();
      await a.watch();
      expect(count('app_watch')).toBe(1);
      expect(a.status?.engine).toBe('idle');
      await a.setup({ base_path: '/m/smollm2.gguf', embedder_path: '/m/minilm', base_id: null });
      // FirstRun's refresh after setup reads once; it must not subscribe again.
      await a.refresh();
      expect(count('app_watch')).toBe(1);
      expect(a.status?.engine).toBe('loading');
      const reads = count('app_status');
      await vi.advanceTimersByTimeAsync(4999);
      expect(a.status?.engine).toBe('loading');
      expect(count('app_status')).toBe(reads);
      await vi.advanceTimersByTimeAsync(1);
      expect(a.status?.engine).toBe('ready');
      expect(a.status?.base?.id).toBe('smollm2.gguf');
      expect(a.settings).not.toBeNull();
      expect(count('app_status')).toBe(reads);
      expect(vi.getTimerCount()).toBe(0);
    } finally {
      vi.useRealTimers();
    }
  });

  it('a status read answered after the watch spoke does not undo it', async () => {
    vi.useFakeTimers();
    try {
      const { AppStore } = await import('../lib/stores/app.svelte');
      fake = createFakeBackend({ ready: false, loadMs: 100 });
      let release: () => void = () => {};
      const held = new Promise<void>((r) => (release = r));
      // app_status reads the state now but answers only once released.
      setTransport(async (cmd, args) => {
        const res = await fake.invoke(cmd, args);
        if (cmd === 'app_status') await held;
        return res;
      }, fake.channel);
      const a = new AppStore();
      await a.watch();
      await a.setup({ base_path: '/m/smollm2.gguf', embedder_path: '/m/minilm', base_id: null });
      const read = a.refresh();
      await vi.advanceTimersByTimeAsync(100);
      expect(a.status?.engine).toBe('ready');
      release();
      expect((await read)?.engine).toBe('ready');
      expect(a.status?.engine).toBe('ready');
    } finally {
      vi.useRealTimers();
    }
  });
});
