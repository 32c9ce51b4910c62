import { describe, it, expect, beforeEach } from 'vitest';
import { api, setTransport, toApiError, newTaskId, ERROR_CODES, type AppStatus, type EventChannel, type ChatEvent, type SendRequest } from '../lib/api';

type Call = { cmd: string; args?: Record<string, unknown> };

describe('api layer', () => {
  let calls: Call[];
  beforeEach(() => {
    calls = [];
  });

  it('sends the contract command names and argument names', async () => {
    setTransport(async (cmd, args) => {
      calls.push({ cmd, args });
      return null;
    }, (<T>(on: (e: T) => void) => ({ onmessage: on })) as never);
    await api.appStatus();
    await api.setupModels({ base_path: '/b', embedder_path: '/e', base_id: null });
    await api.adapterSetEnabled('sql', false);
    await api.adapterSetSamples('sql', ['a', 'b']);
    await api.chatRename(3, 'T');
    await api.chatSetSystemPrompt(3, null);
    await api.chatExport(3, 'markdown');
    await api.taskCancel('t-1');
    await api.hubTokenSet('hf_x');
    await api.adapterInstall({ repo: 'a/b', revision: null, subfolder: null }, 'task-9', () => {});

    expect(calls.map((c) => c.cmd)).toEqual([
      'app_status',
      'setup_models',
      'adapter_set_enabled',
      'adapter_set_samples',
      'chat_rename',
      'chat_set_system_prompt',
      'chat_export',
      'task_cancel',
      'hub_token_set',
      'adapter_install',
    ]);
    expect(calls[1].args).toEqual({ request: { base_path: '/b', embedder_path: '/e', base_id: null } });
    expect(calls[2].args).toEqual({ id: 'sql', enabled: false });
    expect(calls[3].args).toEqual({ id: 'sql', samples: ['a', 'b'] });
    expect(calls[4].args).toEqual({ id: 3, title: 'T' });
    expect(calls[5].args).toEqual({ id: 3, system_prompt: null });
    expect(calls[6].args).toEqual({ id: 3, format: 'markdown' });
    expect(calls[7].args).toEqual({ task_id: 't-1' });
    expect(calls[8].args).toEqual({ token: 'hf_x' });
    expect(Object.keys(calls[9].args!).sort()).toEqual(['on_progress', 'request', 'task_id']);
    expect(calls[9].args!.task_id).toBe('task-9');
  });

  it('maps every kind of rejection to an ApiError', async () => {
    setTransport(async () => {
      throw { code: 'hub', message: 'rate limited' };
    });
    await expect(api.hubSearch({ query: 'x', sort: 'likes', limit: 5 })).rejects.toEqual({ code: 'hub', message: 'rate limited' });

    setTransport(async () => {
      throw 'plain string from the shell';
    });
    await expect(api.adaptersList()).rejects.toEqual({ code: 'internal', message: 'plain string from the shell' });

    setTransport(async () => {
      throw new Error('boom');
    });
    await expect(api.chatsList()).rejects.toEqual({ code: 'internal', message: 'boom' });

    // A code outside ERROR_CODES is the shell's bug: internal, with its message kept.
    expect(toApiError({ code: 404, message: 7 })).toEqual({ code: 'internal', message: '7' });
    expect(toApiError({ code: 'teapot', message: 'short and stout' })).toEqual({ code: 'internal', message: 'short and stout' });
    for (const code of ERROR_CODES) expect(toApiError({ code, message: 'm' }).code).toBe(code);
  });

  it('delivers channel events to the callback, in order', async () => {
    let seen: unknown = null;
    setTransport(
      async (cmd, args) => {
        seen = args;
        const ch = args!.on_event as EventChannel<ChatEvent>;
        ch.onmessage({ event: 'text', delta: 'Hel' });
        ch.onmessage({ event: 'text', delta: 'lo' });
        return { reply: 'Hello' };
      },
      <T>(on: (e: T) => void) => ({ onmessage: on }),
    );
    const got: string[] = [];
    const req = { stream_id: 's1' } as SendRequest;
    const r = await api.chatSend(req, (e) => {
      if (e.event === 'text') got.push(e.delta);
    });
    expect(got).toEqual(['Hel', 'lo']);
    expect(r).toEqual({ reply: 'Hello' });
    expect((seen as Record<string, unknown>).request).toBe(req);
  });

  it('app_watch passes an on_status channel and resolves with the status now', async () => {
    const now = { engine: 'loading' } as AppStatus;
    let ch: EventChannel<AppStatus> | null = null;
    setTransport(
      async (cmd, args) => {
        calls.push({ cmd, args });
        ch = args!.on_status as EventChannel<AppStatus>;
        return now;
      },
      <T>(on: (e: T) => void) => ({ onmessage: on }),
    );
    const heard: string[] = [];
    expect(await api.appWatch((s) => heard.push(s.engine))).toBe(now);
    expect(calls.map((c) => c.cmd)).toEqual(['app_watch']);
    expect(Object.keys(calls[0].args!)).toEqual(['on_status']);
    ch!.onmessage({ engine: 'ready' } as AppStatus);
    expect(heard).toEqual(['ready']);
  });

  it('makes unique task ids', () => {
    const a = newTaskId('chat');
    const b = newTaskId('chat');
    expect(a).not.toBe(b);
    expect(a.startsWith('chat-')).toBe(true);
  });
});
