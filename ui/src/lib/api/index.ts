// The only module that calls Tauri's invoke (DESIGN.md 2). Every command of src-tauri has one
// typed function here; errors always reject with an ApiError {code, message}.
import { invoke as tauriInvoke, Channel } from '@tauri-apps/api/core';
import type {
  AddLocalRequest,
  Adapter,
  AdapterDetail,
  AdapterHit,
  ApiError,
  AppSettings,
  AppStatus,
  ChatEvent,
  ChatReply,
  ChatSession,
  ErrorCode,
  ExportFormat,
  Exported,
  HubSearchRequest,
  InstallRequest,
  ProgressEvent,
  Pulled,
  PullRequest,
  SendRequest,
  SetupRequest,
  TrainProgress,
  TrainRequest,
  Transcript,
} from './types';
import { ERROR_CODES } from './types';

export * from './types';

type Invoke = (cmd: string, args?: Record<string, unknown>) => Promise<unknown>;
/** A channel the shell sends events through (Tauri's Channel, or a fake in tests). */
export interface EventChannel<T> {
  onmessage: (event: T) => void;
}
type MakeChannel = <T>(onEvent: (e: T) => void) => EventChannel<T>;

let invokeImpl: Invoke = tauriInvoke as Invoke;
let makeChannel: MakeChannel = <T>(onEvent: (e: T) => void) => {
  const ch = new Channel<T>();
  ch.onmessage = onEvent;
  return ch;
};

/** Tests replace the transport (no window, no Tauri). */
export function setTransport(invoke: Invoke, channel?: MakeChannel): void {
  invokeImpl = invoke;
  if (channel) makeChannel = channel;
}

function isErrorCode(code: unknown): code is ErrorCode {
  return (ERROR_CODES as unknown[]).includes(code);
}

/** Turns whatever a command rejected with into an ApiError. */
export function toApiError(e: unknown): ApiError {
  if (e && typeof e === 'object' && 'code' in e && 'message' in e) {
    const { code, message } = e as { code: unknown; message: unknown };
    // A code the shell does not define is a bug, not something the UI can act on.
    return { code: isErrorCode(code) ? code : 'internal', message: String(message) };
  }
  if (e instanceof Error) return { code: 'internal', message: e.message };
  return { code: 'internal', message: String(e) };
}

async function call<T>(cmd: string, args?: Record<string, unknown>): Promise<T> {
  try {
    return (await invokeImpl(cmd, args)) as T;
  } catch (e) {
    throw toApiError(e);
  }
}

let nextTask = 0;
/** A fresh id for a cancellable task (install, pull, train, chat stream). */
export function newTaskId(prefix = 'task'): string {
  nextTask += 1;
  return `${prefix}-${Date.now().toString(36)}-${nextTask}`;
}

export const api = {
  appStatus: () => call<AppStatus>('app_status'),
  /**
   * Resolves with the status now, then sends the new status through `onStatus` each time the
   * engine's state changes (loading -> ready / failed, another base loading): no polling.
   */
  appWatch: (onStatus: (s: AppStatus) => void) => call<AppStatus>('app_watch', { on_status: makeChannel(onStatus) }),
  /** Records the base model and embedder, then loads the model (status.engine shows progress). */
  setupModels: (request: SetupRequest) => call<AppStatus>('setup_models', { request }),
  /** Downloads a base model or embedder from the Hub into the shared cache. */
  modelPull: (request: PullRequest, taskId: string, onProgress: (e: ProgressEvent) => void) =>
    call<Pulled>('model_pull', { request, task_id: taskId, on_progress: makeChannel(onProgress) }),

  hubSearch: (request: HubSearchRequest) => call<AdapterHit[]>('hub_search', { request }),
  adapterInstall: (request: InstallRequest, taskId: string, onProgress: (e: ProgressEvent) => void) =>
    call<Adapter>('adapter_install', {
      request,
      task_id: taskId,
      on_progress: makeChannel(onProgress),
    }),
  /** Stops an install, pull, training or chat stream; resolves true when the task was running. */
  taskCancel: (taskId: string) => call<boolean>('task_cancel', { task_id: taskId }),

  adaptersList: () => call<Adapter[]>('adapters_list'),
  adapterGet: (id: string) => call<AdapterDetail>('adapter_get', { id }),
  adapterSetEnabled: (id: string, enabled: boolean) =>
    call<Adapter>('adapter_set_enabled', { id, enabled }),
  adapterRemove: (id: string) => call<Adapter>('adapter_remove', { id }),
  adapterAddLocal: (request: AddLocalRequest) => call<Adapter>('adapter_add_local', { request }),
  /** Replaces the sample prompts (origin "user") and re-embeds the adapter. */
  adapterSetSamples: (id: string, samples: string[]) =>
    call<AdapterDetail>('adapter_set_samples', { id, samples }),
  /** Trains a LoRA on the active base and installs it. */
  adapterTrain: (request: TrainRequest, taskId: string, onProgress: (e: TrainProgress) => void) =>
    call<Adapter>('adapter_train', {
      request,
      task_id: taskId,
      on_progress: makeChannel(onProgress),
    }),

  chatsList: () => call<ChatSession[]>('chats_list'),
  chatGet: (id: number) => call<Transcript>('chat_get', { id }),
  chatRename: (id: number, title: string) => call<ChatSession>('chat_rename', { id, title }),
  chatSetSystemPrompt: (id: number, systemPrompt: string | null) =>
    call<ChatSession>('chat_set_system_prompt', { id, system_prompt: systemPrompt }),
  chatDelete: (id: number) => call<void>('chat_delete', { id }),
  /** Writes the session to the Downloads folder (else the data folder) and returns it. */
  chatExport: (id: number, format: ExportFormat) => call<Exported>('chat_export', { id, format }),
  /** Streams a reply; resolves with the stored reply when done (Stop: finish_reason "cancelled"). */
  chatSend: (request: SendRequest, onEvent: (e: ChatEvent) => void) =>
    call<ChatReply>('chat_send', { request, on_event: makeChannel(onEvent) }),

  settingsGet: () => call<AppSettings>('settings_get'),
  /** Saves the editable fields (token_set / token_store / data_dir are read-only here). */
  settingsSet: (settings: AppSettings) => call<AppSettings>('settings_set', { settings }),
  /** Stores the Hub token in the system keyring; null or "" deletes it. */
  hubTokenSet: (token: string | null) => call<AppSettings>('hub_token_set', { token }),
};

export type Api = typeof api;
