;;; eglot_e2e.el --- drive eglot (Emacs 28 + eglot 1.9, Emacs 30 + eglot 1.17) against gemma-lsp, print JSON -*- lexical-binding: t -*-
;; Usage: emacs --batch -l eglot_e2e.el FILE   (env GEMMA_LSP_PYTHON: the python running gemma_lsp)
;; Types at the end of FILE, completes with eglot's completion-at-point and accepts the
;; suggestion, then runs the "Add docstring with Gemma" code action on the deposit method as
;; eglot does when the user picks it (its command: the server answers at once and sends the edit
;; as workspace/applyEdit), then "Explain with Gemma" (the text arrives as a message or a
;; document).
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
       (eglot-confirm-server-edits nil)            ; (its name since eglot 1.16)
       (explained nil)
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
        ;; ask as a user would, again until there is an item: the server answers within
        ;; completion.menuWaitMs (nothing rather than a fragment) and decodes on meanwhile
        (let* ((capf nil) (cands nil) (tries 0) beg end exit)
          (while (and (not cands) (< tries 150))
            (setq tries (1+ tries))
            (condition-case nil
                (setq capf (eglot-completion-at-point)
                      cands (all-completions
                             (buffer-substring-no-properties (nth 0 capf) (nth 1 capf))
                             (nth 2 capf)))
              (error nil))
            (unless cands (sleep-for 2)))
          (setq beg (nth 0 capf) end (nth 1 capf)
                exit (plist-get (nthcdr 3 capf) :exit-function))
          (gl-step "completion_asks" tries)
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
          (gl-step "command_before_resolve" (and cmd t))
          (let ((t0 (float-time)))
            (if (fboundp 'eglot-execute)   ; eglot 1.17: what picking the action runs
                (eglot-execute (eglot-current-server) doc)
              (eglot-execute-command (eglot-current-server) (intern (plist-get cmd :command))
                                     (plist-get cmd :arguments)))
            (gl-step "answered_s" (- (float-time) t0)))
          (gl-wait (lambda () (not (equal before (buffer-string)))) 300))
        (save-buffer)
        (gl-step "docstring_text" (buffer-substring-no-properties (point-min) (point-max)))
        ;; Explain: answered at once, the text comes later as a message or a document
        (let* ((beg (progn (goto-char (point-min)) (forward-line 8) (point)))
               (end (progn (forward-line 4) (point)))
               (actions (eglot-code-actions beg end))
               (ex (seq-find (lambda (a) (equal (plist-get a :title) "Explain with Gemma"))
                             actions))
               (t0 (float-time)))
          (advice-add 'eglot--message :before
                      (lambda (fmt &rest args)
                        (push (apply #'format fmt args) explained)))
          (advice-add 'find-file-noselect :before
                      (lambda (f &rest _) (when (string-match-p "gemma-explain" f)
                                            (push f explained))))
          (if (fboundp 'eglot-execute)
              (eglot-execute (eglot-current-server) ex)
            (let ((cmd (plist-get ex :command)))
              (eglot-execute-command (eglot-current-server) (intern (plist-get cmd :command))
                                     (plist-get cmd :arguments))))
          (gl-step "explain_answered_s" (- (float-time) t0))
          (gl-wait (lambda () (seq-find (lambda (m) (string-match-p
                                                     "gemma-explain\\|Server reports" m))
                                        explained)) 300)
          (gl-step "explained" (vconcat explained)))
        (eglot-shutdown (eglot-current-server)))
    (error (gl-step "error" (error-message-string err))))
  (princ (concat (json-encode gl-result) "\n")))
