# Reference maximum-likelihood fits for models with several grouping factors
# (crossed and nested random effects), on four data sets shipped with lme4.
#
# Exports the data to curvi/datasets/ (penicillin.csv, pastes.csv,
# grouseticks.csv, insteval.csv.gz) and prints, with 10 significant digits,
# glmmTMB's Laplace ML fit of each model, that optimum polished by Newton
# steps on glmmTMB's own objective (nlminb stops short of rel.tol = 1e-14,
# see tmb_check), and lme4's fit of the same model (lmer with REML = FALSE;
# glmer with nAGQ = 1, i.e. Laplace), with the differences. The polished
# numbers are the references. The numbers are copied into PENICILLIN_GLMMTMB,
# PASTES_GLMMTMB, GROUSETICKS_GLMMTMB and INSTEVAL_GLMMTMB in
# curvi/datasets/__init__.py and into curvi/datasets/README.md.
#
# Run from the repository root:
#     Rscript benchmarks/reference/grouping_factors.R [output_dir]
# (output_dir defaults to curvi/datasets). Made with the Debian packages
# r-base-core, r-cran-lme4 and r-cran-glmmtmb (Debian 12); the versions are
# printed at the top of the output.

suppressPackageStartupMessages({
  library(lme4)
  library(glmmTMB)
})

args <- commandArgs(trailingOnly = TRUE)
out_dir <- if (length(args) >= 1) args[1] else "curvi/datasets"
stopifnot(dir.exists(out_dir))

options(digits = 10)
fmt <- function(x) sprintf("%.10g", x)
say <- function(...) cat(..., "\n", sep = "")

say(R.version.string)
say("glmmTMB ", format(packageVersion("glmmTMB")),
    ", lme4 ", format(packageVersion("lme4")),
    ", TMB ", format(packageVersion("TMB")),
    ", Matrix ", format(packageVersion("Matrix")))

tmb_control <- glmmTMBControl(
  optCtrl = list(iter.max = 1e4, eval.max = 1e4, rel.tol = 1e-14)
)

# Convergence of a glmmTMB fit. With rel.tol = 1e-14 nlminb stops with
# "singular convergence (7)" on all four fits here: it cannot meet the
# relative tolerance asked for (on Penicillin the point is the one
# rel.tol = 1e-10 reaches with "relative convergence (4)"). Accept that, or
# success, when the Hessian is positive definite; print the message and the
# gradient (tmb_polished below then checks the optimum).
tmb_check <- function(fit) {
  say("  glmmTMB optimiser: ", fit$fit$message, " (code ",
      fit$fit$convergence, "); max |gradient| ",
      fmt(max(abs(fit$sdr$gradient.fixed))),
      "; positive definite Hessian: ", fit$sdr$pdHess)
  stopifnot(fit$fit$convergence == 0 ||
              grepl("singular convergence", fit$fit$message),
            isTRUE(fit$sdr$pdHess))
}

# Fixed effects, random-effect sds by grouping factor, residual sd (Gaussian
# only) and logLik of glmmTMB's Laplace ML objective at the parameter vector
# par (beta; betad = log residual variance, for the Gaussian family in
# glmmTMB 1.1.5; theta = log sds in the order of VarCorr's terms).
tmb_at <- function(fit, par, gaussian) {
  beta <- par[names(par) == "beta"]
  names(beta) <- names(fixef(fit)$cond)
  sds <- exp(par[names(par) == "theta"])
  names(sds) <- names(VarCorr(fit)$cond)
  list(
    fixed = beta,
    sds = sds,
    residual_sd = if (gaussian) exp(0.5 * par[names(par) == "betad"][[1]]) else NA,
    loglik = -as.numeric(fit$obj$fn(par))
  )
}

tmb_summary <- function(fit, gaussian) {
  tmb_check(fit)
  at <- tmb_at(fit, fit$fit$par, gaussian)
  # tmb_at reads the parameters as glmmTMB's own extractors do:
  vc <- VarCorr(fit)$cond
  stopifnot(
    isTRUE(all.equal(at$fixed, fixef(fit)$cond, tolerance = 1e-12)),
    isTRUE(all.equal(at$sds, sapply(vc, function(v) attr(v, "stddev")[[1]]),
                     tolerance = 1e-12)),
    !gaussian || isTRUE(all.equal(at$residual_sd, sigma(fit),
                                  tolerance = 1e-12)),
    isTRUE(all.equal(at$loglik, as.numeric(logLik(fit)), tolerance = 1e-12))
  )
  at
}

# glmmTMB's optimum polished (the reference numbers): Newton steps on its
# outer objective (Hessian by finite differences of TMB's exact gradient,
# optimHess) from nlminb's point, until the gradient stops shrinking.
tmb_polished <- function(fit, gaussian) {
  par <- fit$fit$par
  g <- fit$obj$gr(par)
  steps <- 0
  while (steps < 10) {
    step <- solve(optimHess(par, fit$obj$fn, fit$obj$gr), as.vector(g))
    g_new <- fit$obj$gr(par - step)
    if (max(abs(g_new)) >= max(abs(g))) break
    par <- par - step
    g <- g_new
    steps <- steps + 1
  }
  say("  after ", steps, " Newton steps: max |gradient| ", fmt(max(abs(g))))
  stopifnot(max(abs(g)) < 1e-10 * max(1, abs(fit$fit$objective)))
  tmb_polish <- tmb_at(fit, par, gaussian)
  fit$obj$fn(fit$fit$par)  # leave the TMB object at glmmTMB's optimum
  tmb_polish
}

# The same from an lme4 fit, after checking convergence and singularity.
lme4_summary <- function(fit, gaussian) {
  msgs <- fit@optinfo$conv$lme4$messages
  say("  lme4 optimiser code ", fit@optinfo$conv$opt,
      "; convergence messages: ",
      if (length(msgs)) paste(msgs, collapse = " | ") else "none",
      "; singular: ", isSingular(fit))
  stopifnot(fit@optinfo$conv$opt == 0, length(msgs) == 0)
  vc <- as.data.frame(VarCorr(fit))
  re <- vc[vc$grp != "Residual", ]
  list(
    fixed = fixef(fit),
    sds = setNames(re$sdcor, re$grp),
    residual_sd = if (gaussian) sigma(fit) else NA,
    loglik = as.numeric(logLik(fit))
  )
}

# One line per quantity: glmmTMB's fit as nlminb left it, the same objective
# Newton-polished (the reference numbers of curvi/datasets), lme4's fit, and
# the differences lme4 - polished and polished - nlminb.
report <- function(name, fit, l4, gaussian) {
  tmb <- tmb_summary(fit, gaussian)
  pol <- tmb_polished(fit, gaussian)
  say("== ", name, ": glmmTMB (nlminb) | glmmTMB polished | lme4 | ",
      "lme4 - polished | polished - nlminb")
  line <- function(label, a, p, l, f = fmt) {
    say(sprintf("  %-18s %-18s %-18s %-18s %-18s %s", label, f(a), f(p),
                f(l), fmt(l - p), fmt(p - a)))
  }
  for (k in names(tmb$fixed)) {
    line(paste("fixed", k), tmb$fixed[[k]], pol$fixed[[k]], l4$fixed[[k]])
  }
  for (k in names(tmb$sds)) {
    line(paste("sd", k), tmb$sds[[k]], pol$sds[[k]], l4$sds[[k]])
  }
  if (gaussian) {
    line("residual sd", tmb$residual_sd, pol$residual_sd, l4$residual_sd)
  }
  # (15 digits: InstEval's logLik is of order 1e5)
  line("logLik", tmb$loglik, pol$loglik, l4$loglik,
       function(x) sprintf("%.15g", x))
}

# --- a. Penicillin: crossed, 24 plates x 6 samples ------------------------
data(Penicillin, package = "lme4")
write.csv(Penicillin, file.path(out_dir, "penicillin.csv"), row.names = FALSE)
say("\n# Penicillin: ", nrow(Penicillin), " rows, ",
    nlevels(Penicillin$plate), " plates, ", nlevels(Penicillin$sample),
    " samples; mean(diameter) = ", fmt(mean(Penicillin$diameter)))
f_pen <- diameter ~ 1 + (1 | plate) + (1 | sample)
tmb_pen <- glmmTMB(f_pen, data = Penicillin, family = gaussian,
                   REML = FALSE, control = tmb_control)
l4_pen <- lmer(f_pen, data = Penicillin, REML = FALSE)
report("Penicillin", tmb_pen, lme4_summary(l4_pen, TRUE), TRUE)

# --- b. Pastes: nested, 10 batches, 30 batch:cask samples -----------------
# (1 | batch / cask) is (1 | batch) + (1 | batch:cask); lme4's column
# `sample` is the factor batch:cask (labels "A:a" ...).
data(Pastes, package = "lme4")
stopifnot(identical(as.character(Pastes$sample),
                    as.character(interaction(Pastes$batch, Pastes$cask,
                                             sep = ":"))))
write.csv(Pastes, file.path(out_dir, "pastes.csv"), row.names = FALSE)
say("\n# Pastes: ", nrow(Pastes), " rows, ", nlevels(Pastes$batch),
    " batches, ", nlevels(Pastes$sample), " samples (batch:cask); ",
    "mean(strength) = ", fmt(mean(Pastes$strength)))
f_pas <- strength ~ 1 + (1 | batch / cask)
tmb_pas <- glmmTMB(f_pas, data = Pastes, family = gaussian,
                   REML = FALSE, control = tmb_control)
l4_pas <- lmer(f_pas, data = Pastes, REML = FALSE)
report("Pastes", tmb_pas, lme4_summary(l4_pas, TRUE), TRUE)

# --- c. grouseticks: three factors, Poisson --------------------------------
# cHEIGHT = HEIGHT - mean(HEIGHT), as in ?grouseticks (Elston et al. 2001);
# the shipped column cHEIGHT is checked against that.
data(grouseticks, package = "lme4")
gt <- grouseticks
gt$cHEIGHT <- gt$HEIGHT - mean(gt$HEIGHT)
stopifnot(isTRUE(all.equal(gt$cHEIGHT, grouseticks$cHEIGHT, tolerance = 1e-12)))
write.csv(gt, file.path(out_dir, "grouseticks.csv"), row.names = FALSE)
say("\n# grouseticks: ", nrow(gt), " rows, ", nlevels(gt$INDEX),
    " individuals, ", nlevels(gt$BROOD), " broods, ", nlevels(gt$LOCATION),
    " locations; mean(TICKS) = ", fmt(mean(gt$TICKS)),
    ", mean(HEIGHT) = ", fmt(mean(gt$HEIGHT)),
    "; design columns: ",
    paste(colnames(model.matrix(~ YEAR + cHEIGHT, gt)), collapse = ", "))
f_gt <- TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)
tmb_gt <- glmmTMB(f_gt, data = gt, family = poisson, control = tmb_control)
l4_gt <- glmer(f_gt, data = gt, family = poisson, nAGQ = 1,
               control = glmerControl(optimizer = "bobyqa",
                                      optCtrl = list(maxfun = 1e5)))
report("grouseticks", tmb_gt, lme4_summary(l4_gt, FALSE), FALSE)

# --- d. InstEval: crossed, 2972 students x 1128 lecturers ------------------
data(InstEval, package = "lme4")
ie <- InstEval[, c("s", "d", "y")]
gz <- gzfile(file.path(out_dir, "insteval.csv.gz"), "w")
write.csv(ie, gz, row.names = FALSE)
close(gz)
say("\n# InstEval: ", nrow(ie), " rows, ", nlevels(ie$s), " students, ",
    nlevels(ie$d), " lecturers; mean(y) = ", fmt(mean(ie$y)))
f_ie <- y ~ 1 + (1 | s) + (1 | d)
t_tmb <- system.time(
  tmb_ie <- glmmTMB(f_ie, data = ie, family = gaussian, REML = FALSE,
                    control = tmb_control)
)
t_l4 <- system.time(l4_ie <- lmer(f_ie, data = ie, REML = FALSE))
say("  elapsed: glmmTMB ", fmt(t_tmb[["elapsed"]]), " s, lme4 ",
    fmt(t_l4[["elapsed"]]), " s")
report("InstEval", tmb_ie, lme4_summary(l4_ie, TRUE), TRUE)
