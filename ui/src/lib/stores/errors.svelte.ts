// The visible, dismissable error banner: every rejected call ends up here or inline.
import { toApiError, type ApiError } from '../api';

export interface ShownError extends ApiError {
  id: number;
  /** What the user was doing, e.g. "Install alice/x". */
  context: string;
}

class ErrorStore {
  list = $state<ShownError[]>([]);
  #next = 1;

  push(context: string, e: unknown): ApiError {
    const err = toApiError(e);
    this.list = [...this.list, { ...err, context, id: this.#next++ }];
    return err;
  }

  dismiss(id: number): void {
    this.list = this.list.filter((e) => e.id !== id);
  }

  clear(): void {
    this.list = [];
  }
}

export const errors = new ErrorStore();
