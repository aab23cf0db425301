;;; eglot_e2e.el --- drive eglot (Emacs 28 + eglot 1.9) against gemma-lsp, print JSON -*- lexical-binding: t -*-
;; Usage: emacs --batch -l eglot_e2e.el FILE   (env GEMMA_LSP_PYTHON: the python running gemma_lsp)
;; Types at the end of FILE, completes with eglot's completion-at-point and accepts the
;; suggestion, then runs the "Add docstring with Gemma" code action on the deposit method.
(require 'package)
(package-initialize)
(require 'eglot)
(require 'python)
(require 'json)

(defvar gl-result nil)
(defun gl-step (key value) (push (cons key value) gl-result))
(defun gl-wait (pred secs)
  "Process events until PRED is true or SECS pass."
  (let ((deadline (+ (float-time) secs)))
    (while (and (not (funcall pred)) (< (float-time) deadline))
      (accept-process-output nil 0.1))
    (funcall pred)))

(let* ((file (expand-file-name (car command-line-args-left)))
       (dir (file-name-directory file))
       (python (or (getenv "GEMMA_LSP_PYTHON") "python3"))
       (project-find-functions (list (lambda (_) (cons 'transient dir))))
       (eglot-sync-connect 120)
       (eglot-confirm-server-initiated-edits nil) ; apply workspace/applyEdit without asking
       (eglot-server-programs
        `((python-mode . (,python "-m" "gemma_lsp" :initializationOptions
                          (:gemma (:completion (:debounceMs 0 :latencyBudgetMs 0 :maxTokens 16)
                                   :actions (:maxTokens 64 :temperature 0))))))))
  (setq command-line-args-left nil)
  (condition-case err
      (progn
        (find-file file)
        (python-mode)
        (apply #'eglot (eglot--guess-contact))
        (gl-step "connected" (and (eglot-current-server) t))
        ;; type a line and complete it
        (goto-char (point-max))
        (insert "\n        if amount")
        (eglot--signal-textDocument/didChange)
        (let* ((capf (eglot-completion-at-point))
               (beg (nth 0 capf)) (end (nth 1 capf)) (table (nth 2 capf))
               (cands (all-completions (buffer-substring-no-properties beg end) table))
               (exit (plist-get (nthcdr 3 capf) :exit-function)))
          (gl-step "candidates" (vconcat cands))
          (when cands
            (delete-region beg end)
            (goto-char beg)
            (insert (car cands))
            (funcall exit (car cands) 'finished)))
        (gl-step "completed_text" (buffer-substring-no-properties (point-min) (point-max)))
        (save-buffer)
        ;; the docstring code action on the deposit method (lines 9..12)
        (let* ((beg (progn (goto-char (point-min)) (forward-line 8) (point)))
               (end (progn (forward-line 4) (point)))
               (actions (eglot-code-actions beg end))
               (doc (seq-find (lambda (a) (equal (plist-get a :title) "Add docstring with Gemma"))
                              actions))
               (cmd (plist-get doc :command))
               (before (buffer-string)))
          (gl-step "actions" (vconcat (mapcar (lambda (a) (plist-get a :title)) actions)))
          (eglot-execute-command (eglot-current-server) (intern (plist-get cmd :command))
                                 (plist-get cmd :arguments))
          (gl-wait (lambda () (not (equal before (buffer-string)))) 120))
        (save-buffer)
        (gl-step "docstring_text" (buffer-substring-no-properties (point-min) (point-max)))
        (eglot-shutdown (eglot-current-server)))
    (error (gl-step "error" (error-message-string err))))
  (princ (concat (json-encode gl-result) "\n")))
