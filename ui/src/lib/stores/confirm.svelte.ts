// The in-app confirmation dialog (ConfirmDialog.svelte, mounted once in App.svelte), used instead
// of the browser's confirm(): native dialogs are unreliable in the Tauri webview and cannot be
// driven by the GUI tests. One question at a time: a new ask cancels the open one (it resolves false).

export interface ConfirmOptions {
  /** Style the confirm button as a destructive action (default true). */
  danger?: boolean;
  /** The cancel button's label (default "Cancel"). */
  cancelLabel?: string;
}

export interface ConfirmQuestion {
  /** Distinguishes successive questions (a stale answer for an older one is ignored). */
  id: number;
  message: string;
  confirmLabel: string;
  cancelLabel: string;
  danger: boolean;
}

export class ConfirmStore {
  /** The question shown now; null = no dialog. */
  current = $state<ConfirmQuestion | null>(null);
  #resolve: ((yes: boolean) => void) | null = null;
  #next = 1;

  ask(message: string, confirmLabel = 'Confirm', opts: ConfirmOptions = {}): Promise<boolean> {
    // Only one question at a time: the open one is cancelled.
    this.answer(false);
    const q: ConfirmQuestion = {
      id: this.#next++,
      message,
      confirmLabel,
      cancelLabel: opts.cancelLabel ?? 'Cancel',
      danger: opts.danger ?? true,
    };
    return new Promise<boolean>((resolve) => {
      this.current = q;
      this.#resolve = resolve;
    });
  }

  /** Answers the open question (or question `id`, if given and still open); no-op otherwise. */
  answer(yes: boolean, id?: number): void {
    if (!this.current || (id !== undefined && id !== this.current.id)) return;
    const resolve = this.#resolve;
    this.current = null;
    this.#resolve = null;
    resolve?.(yes);
  }

  get open(): boolean {
    return this.current !== null;
  }
}

export const confirmStore = new ConfirmStore();

/** Asks `message` in the in-app dialog; resolves true on confirm, false on cancel / Escape / superseded. */
export function askConfirm(message: string, confirmLabel = 'Confirm', opts: ConfirmOptions = {}): Promise<boolean> {
  return confirmStore.ask(message, confirmLabel, opts);
}
