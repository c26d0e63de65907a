# Reference Laplace maximum-likelihood fits, by glmmTMB, for curvi's
# lme4-style formula front end (curvi.glmm): ten models on five data sets
# bundled in curvi/datasets/, written to curvi/datasets/glmm_reference.json
# (one entry per case; the keys are described in curvi/datasets/README.md,
# section "glmm_reference.json").
#
# 1. Exports the two data sets not bundled before, lme4's sleepstudy (with a
#    weight column w = 1 + (i mod 3), i the 0-based row index) and mlmRev's
#    Contraception (use coded 0/1, Y = 1), to sleepstudy.csv and
#    contraception.csv (write.csv, row.names = FALSE, factors as their
#    labels). The other CSVs (cbpp, grouseticks, pastes) are only read.
# 2. Reads every data set back from its CSV, so that R and Python fit the
#    same rows, and checks the rows against the R package's copy.
# 3. Fits each case with glmmTMB (Laplace, ML: the defaults), checks
#    convergence (nlminb's message, a positive definite Hessian, the
#    gradient), then polishes the optimum by Newton steps on glmmTMB's own
#    objective to a gradient below 1e-8 (tmb_polish; the printed differences
#    from nlminb's point are the size of its stopping error), and records
#    the polished fit: fixed effects with standard errors (from TMB's
#    sdreport at that point), random-effect sds and correlations, the
#    residual sd or nbinom2 dispersion, logLik, df, AIC, BIC, nobs.
# 4. Cross-checks each fit with lme4 (lmer with REML = FALSE; glmer, nAGQ =
#    1, i.e. Laplace; glmer.nb) and prints both log likelihoods.
#
# Run from the repository root:
#     Rscript benchmarks/reference/glmm.R [data_dir]
# (data_dir defaults to curvi/datasets). Made with the Debian 12 packages
# r-base-core, r-cran-glmmtmb, r-cran-lme4, r-cran-mlmrev and r-cran-jsonlite;
# the versions are printed at the top of the output.

suppressPackageStartupMessages({
  library(lme4)
  library(glmmTMB)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
data_dir <- if (length(args) >= 1) args[1] else "curvi/datasets"
stopifnot(dir.exists(data_dir))

fmt <- function(x) sprintf("%.10g", x)
say <- function(...) cat(..., "\n", sep = "")

say(R.version.string)
say("glmmTMB ", format(packageVersion("glmmTMB")),
    ", TMB ", format(packageVersion("TMB")),
    ", lme4 ", format(packageVersion("lme4")),
    ", mlmRev ", format(packageVersion("mlmRev")),
    ", jsonlite ", format(packageVersion("jsonlite")))

# --- 1. Export the new data sets -------------------------------------------

data(sleepstudy, package = "lme4")
sleep_out <- sleepstudy
sleep_out$w <- 1L + (seq_len(nrow(sleep_out)) - 1L) %% 3L
write.csv(sleep_out, file.path(data_dir, "sleepstudy.csv"), row.names = FALSE)

data(Contraception, package = "mlmRev")
contra_out <- Contraception
contra_out$use <- as.integer(Contraception$use == "Y")
write.csv(contra_out, file.path(data_dir, "contraception.csv"),
          row.names = FALSE)

# --- 2. Read every data set back from its CSV ------------------------------

# The CSV as a data frame with the named columns as factors. Integer labels
# (herd, period, YEAR, district, Subject, ...) come back as integers and
# give levels in numeric order; character labels get levels in C-locale
# order (as Python's sorted() orders them), whatever R's locale.
read_frame <- function(file, factors) {
  df <- read.csv(file.path(data_dir, file), stringsAsFactors = FALSE)
  for (col in factors) {
    x <- df[[col]]
    df[[col]] <- if (is.numeric(x)) factor(x) else
      factor(x, levels = sort(unique(x), method = "radix"))
  }
  df
}

# The rows read back are the R package's rows: same columns, factor labels
# and level order, numbers to 1e-14.
same_rows <- function(read, original) {
  stopifnot(identical(names(read), names(original)),
            nrow(read) == nrow(original))
  for (col in names(original)) {
    a <- read[[col]]
    b <- original[[col]]
    ok <- if (is.factor(b)) {
      is.factor(a) && identical(levels(a), levels(b)) &&
        identical(as.character(a), as.character(b))
    } else {
      isTRUE(all.equal(as.numeric(a), as.numeric(b), tolerance = 1e-14))
    }
    if (!ok) stop("column ", col, " differs from the R package's copy")
  }
}

cbpp <- read_frame("cbpp.csv", c("herd", "period"))
same_rows(cbpp, lme4::cbpp)

sleepstudy <- read_frame("sleepstudy.csv", "Subject")
same_rows(sleepstudy, sleep_out)

contraception <- read_frame("contraception.csv",
                            c("woman", "district", "livch", "urban"))
same_rows(contraception, contra_out)

grouseticks <- read_frame("grouseticks.csv",
                          c("INDEX", "BROOD", "YEAR", "LOCATION"))
gt_original <- lme4::grouseticks
gt_original$cHEIGHT <- gt_original$HEIGHT - mean(gt_original$HEIGHT)
same_rows(grouseticks, gt_original)

pastes <- read_frame("pastes.csv", c("batch", "cask", "sample"))
same_rows(pastes, lme4::Pastes)

say("\nRows: cbpp ", nrow(cbpp), ", sleepstudy ", nrow(sleepstudy),
    ", contraception ", nrow(contraception), ", grouseticks ",
    nrow(grouseticks), ", pastes ", nrow(pastes))

# --- 3. glmmTMB fits ---------------------------------------------------------

# nlminb's point, checked: a positive definite Hessian and a small gradient.
tmb_check <- function(fit) {
  grad <- max(abs(fit$sdr$gradient.fixed))
  say("  glmmTMB optimiser: ", fit$fit$message, " (code ",
      fit$fit$convergence, "); max |gradient| ", fmt(grad),
      "; positive definite Hessian: ", fit$sdr$pdHess)
  stopifnot(fit$fit$convergence == 0, isTRUE(fit$sdr$pdHess), grad < 1e-2)
}

# glmmTMB's optimum polished: Newton steps on its outer objective (Hessian
# by finite differences of TMB's exact gradient, optimHess) from nlminb's
# point, until the gradient stops shrinking. The fit object is then moved
# to the polished point, so that glmmTMB's own extractors (fixef, VarCorr,
# sigma, vcov, logLik, AIC, BIC) report it: fit$fit$par, fit$fit$parfull
# (with the inner optimum of the random effects), fit$fit$objective and
# fit$sdr (sdreport at the new point) are what they read.
tmb_polish <- function(fit) {
  obj <- fit$obj
  par <- fit$fit$par
  g <- obj$gr(par)
  steps <- 0
  while (steps < 20) {
    step <- solve(optimHess(par, obj$fn, obj$gr), as.vector(g))
    g_new <- obj$gr(par - step)
    if (max(abs(g_new)) >= max(abs(g))) break
    par <- par - step
    g <- g_new
    steps <- steps + 1
  }
  say("  after ", steps, " Newton steps: max |gradient| ", fmt(max(abs(g))),
      "; parameters moved by at most ", fmt(max(abs(par - fit$fit$par))))
  stopifnot(max(abs(g)) < 1e-8)
  objective <- obj$fn(par)
  parfull <- obj$env$last.par
  stopifnot(isTRUE(all.equal(unname(parfull[names(parfull) != "b"]),
                             unname(par), tolerance = 0)))
  old_loglik <- as.numeric(logLik(fit))
  fit$fit$par <- par
  fit$fit$parfull <- parfull
  fit$fit$objective <- objective
  fit$sdr <- TMB::sdreport(obj, par.fixed = par)
  say("  polished: positive definite Hessian: ", fit$sdr$pdHess,
      "; logLik ", sprintf("%.15g", -objective), " (nlminb's ",
      sprintf("%.15g", old_loglik), ", difference ",
      fmt(-objective - old_loglik), ")")
  stopifnot(isTRUE(fit$sdr$pdHess), -objective >= old_loglik - 1e-9)
  fit
}

# A JSON entry from a polished fit. groups: the R names of the random-effect
# terms (names(VarCorr(fit)$cond)), named by the grouping factor as written
# in the formula, in the order of the formula.
tmb_entry <- function(fit, groups) {
  fe <- fixef(fit)$cond
  se <- sqrt(diag(vcov(fit)$cond))
  stopifnot(identical(names(fe), names(se)))
  vc <- VarCorr(fit)$cond
  stopifnot(setequal(names(vc), unname(groups)))
  random <- lapply(seq_along(groups), function(i) {
    v <- vc[[groups[[i]]]]
    sds <- attr(v, "stddev")
    cor <- attr(v, "correlation")
    list(
      group = names(groups)[[i]],
      sd = as.list(sds),
      cor = if (length(sds) > 1) unname(cor) else NULL
    )
  })
  family <- family(fit)$family
  ll <- logLik(fit)
  list(
    fixed_effects = unname(lapply(names(fe), function(k) {
      list(k, fe[[k]], se[[k]])
    })),
    random = random,
    sigma = if (family == "gaussian") sigma(fit) else NA,
    dispersion = if (family == "nbinom2") sigma(fit) else NA,
    logLik = as.numeric(ll),
    df = attr(ll, "df"),
    AIC = AIC(fit),
    BIC = BIC(fit),
    nobs = nobs(fit)
  )
}

# An lme4 fit's log likelihood, after checking its optimiser's return code
# (lme4's further convergence warnings, from its own finite-difference
# gradient check, are printed, not fatal: this is only a cross-check).
lme4_loglik <- function(fit) {
  msgs <- fit@optinfo$conv$lme4$messages
  say("  lme4 optimiser code ", fit@optinfo$conv$opt,
      "; convergence messages: ",
      if (length(msgs)) paste(msgs, collapse = " | ") else "none",
      "; singular: ", isSingular(fit))
  stopifnot(fit@optinfo$conv$opt == 0)
  as.numeric(logLik(fit))
}

# lme4's Laplace objective (glmer's deviance function, as a log likelihood)
# at glmmTMB's parameters: a check of the objective itself, not of either
# optimiser. lme4's parameters are c(theta, beta), theta the lower
# triangles (column by column) of the Cholesky factors of the random-effect
# covariance matrices, term by term in the same order as glmmTMB's; for
# glmer.nb the family is the negative binomial with glmmTMB's dispersion.
lme4_at_tmb <- function(l4_fit, fit) {
  cl <- getCall(l4_fit)
  if (family(fit)$family == "nbinom2") {
    cl$family <- bquote(MASS::negative.binomial(theta = .(sigma(fit))))
  }
  cl$devFunOnly <- TRUE
  devfun <- eval(cl)
  vc <- VarCorr(fit)$cond
  stopifnot(length(vc) == length(getME(l4_fit, "cnms")))
  theta <- unlist(lapply(vc, function(v) {
    L <- t(chol(unclass(v)[seq_len(nrow(v)), seq_len(ncol(v)), drop = FALSE]))
    L[lower.tri(L, diag = TRUE)]
  }))
  -0.5 * devfun(c(theta, fixef(fit)$cond))
}

# glmer's defaults stop its inner PIRLS iterations at tolPwrss = 1e-7, which
# moves its Laplace objective by up to 0.007 nats here (grouseticks); with
# 1e-12 it agrees with glmmTMB's (and with a direct Laplace computation) to
# about 1e-6.
glmer_control <- glmerControl(optimizer = "bobyqa", tolPwrss = 1e-12,
                              optCtrl = list(maxfun = 1e5))

entries <- list()
version <- format(packageVersion("glmmTMB"))

# One case: r_command is run as written (the data frames are the ones read
# above), then checked, polished and cross-checked with lme4_command (NULL:
# no lme4 fit).
run_case <- function(name, dataset, formula, family, weights, r_command,
                     groups, lme4_command) {
  say("\n== ", name, ": ", r_command)
  fit <- eval(parse(text = r_command))
  tmb_check(fit)
  fit <- tmb_polish(fit)
  entry <- tmb_entry(fit, groups)
  l4 <- NA
  if (!is.null(lme4_command)) {
    say("  lme4: ", lme4_command)
    l4_fit <- suppressMessages(eval(parse(text = lme4_command)))
    l4 <- lme4_loglik(l4_fit)
    if (is(l4_fit, "glmerMod")) {
      say("  lme4's objective at glmmTMB's parameters: ",
          sprintf("%.15g", lme4_at_tmb(l4_fit, fit)))
    }
  }
  say("  logLik: glmmTMB ", sprintf("%.15g", entry$logLik), ", lme4 ",
      sprintf("%.15g", l4), " (lme4 - glmmTMB ", fmt(l4 - entry$logLik), ")")
  for (fe in entry$fixed_effects) {
    say(sprintf("  %-16s %.10g (se %.6g)", fe[[1]], fe[[2]], fe[[3]]))
  }
  for (r in entry$random) {
    say("  sd | ", r$group, ": ",
        paste(names(r$sd), fmt(unlist(r$sd)), sep = " = ", collapse = ", "),
        if (!is.null(r$cor)) paste0("; cor ", fmt(r$cor[1, 2])) else "")
  }
  if (!is.na(entry$sigma)) say("  sigma ", fmt(entry$sigma))
  if (!is.na(entry$dispersion)) say("  dispersion ", fmt(entry$dispersion))
  entries[[length(entries) + 1]] <<- c(
    list(name = name, dataset = dataset, r_formula = deparse1(fit$call$formula),
         formula = formula, family = family,
         weights = if (is.null(weights)) NULL else weights),
    entry,
    list(lme4_logLik = l4, r_command = r_command, glmmTMB_version = version)
  )
  invisible(fit)
}

run_case(
  "cbpp_binomial", "cbpp.csv",
  "p(incidence, size) ~ period + (1 | herd)", "binomial", NULL,
  "glmmTMB(cbind(incidence, size - incidence) ~ period + (1 | herd), data = cbpp, family = binomial)",
  c(herd = "herd"),
  "glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), data = cbpp, family = binomial, control = glmer_control)"
)

run_case(
  "cbpp_poisson_offset", "cbpp.csv",
  "incidence ~ period + offset(np.log(size)) + (1 | herd)", "poisson", NULL,
  "glmmTMB(incidence ~ period + offset(log(size)) + (1 | herd), data = cbpp, family = poisson)",
  c(herd = "herd"),
  "glmer(incidence ~ period + offset(log(size)) + (1 | herd), data = cbpp, family = poisson, control = glmer_control)"
)

run_case(
  "sleepstudy_correlated", "sleepstudy.csv",
  "Reaction ~ Days + (Days | Subject)", "gaussian", NULL,
  "glmmTMB(Reaction ~ Days + (Days | Subject), data = sleepstudy, family = gaussian)",
  c(Subject = "Subject"),
  "lmer(Reaction ~ Days + (Days | Subject), data = sleepstudy, REML = FALSE)"
)

run_case(
  "sleepstudy_uncorrelated", "sleepstudy.csv",
  "Reaction ~ Days + (Days || Subject)", "gaussian", NULL,
  "glmmTMB(Reaction ~ Days + (1 | Subject) + (0 + Days | Subject), data = sleepstudy, family = gaussian)",
  c(Subject = "Subject", Subject = "Subject.1"),
  "lmer(Reaction ~ Days + (1 | Subject) + (0 + Days | Subject), data = sleepstudy, REML = FALSE)"
)

run_case(
  "contraception_bernoulli", "contraception.csv",
  "use ~ age + I(age**2) + urban + livch + (1 | district)", "bernoulli", NULL,
  "glmmTMB(use ~ age + I(age^2) + urban + livch + (1 | district), data = contraception, family = binomial)",
  c(district = "district"),
  "glmer(use ~ age + I(age^2) + urban + livch + (1 | district), data = contraception, family = binomial, control = glmer_control)"
)

run_case(
  "contraception_correlated", "contraception.csv",
  "use ~ age + urban + livch + (1 + urban | district)", "bernoulli", NULL,
  "glmmTMB(use ~ age + urban + livch + (1 + urban | district), data = contraception, family = binomial)",
  c(district = "district"),
  "glmer(use ~ age + urban + livch + (1 + urban | district), data = contraception, family = binomial, control = glmer_control)"
)

run_case(
  "grouseticks_poisson", "grouseticks.csv",
  "TICKS ~ YEAR + (1 | BROOD) + (1 | LOCATION)", "poisson", NULL,
  "glmmTMB(TICKS ~ YEAR + (1 | BROOD) + (1 | LOCATION), data = grouseticks, family = poisson)",
  c(BROOD = "BROOD", LOCATION = "LOCATION"),
  "glmer(TICKS ~ YEAR + (1 | BROOD) + (1 | LOCATION), data = grouseticks, family = poisson, control = glmer_control)"
)

fit_nb <- run_case(
  "grouseticks_nbinom2", "grouseticks.csv",
  "TICKS ~ YEAR + (1 | LOCATION)", "negativebinomial", NULL,
  "glmmTMB(TICKS ~ YEAR + (1 | LOCATION), data = grouseticks, family = nbinom2)",
  c(LOCATION = "LOCATION"),
  "glmer.nb(TICKS ~ YEAR + (1 | LOCATION), data = grouseticks, control = glmer_control)"
)

# lme4's Laplace objective differs from glmmTMB's for the negative binomial
# (0.22 nats at glmmTMB's parameters): with its non-canonical log link,
# glmer's log determinant uses the expected (Fisher) information of the
# random effects, glmmTMB's the observed Hessian, the Laplace approximation
# proper. Both, computed directly at glmmTMB's parameters (Newton for the
# random effects' mode u, b = sd * u):
local({
  beta <- fixef(fit_nb)$cond
  sd <- attr(VarCorr(fit_nb)$cond$LOCATION, "stddev")[[1]]
  phi <- sigma(fit_nb)
  X <- model.matrix(~ YEAR, grouseticks)
  Z <- sd * model.matrix(~ 0 + LOCATION, grouseticks)
  y <- grouseticks$TICKS
  mu <- function(u) exp(drop(X %*% beta + Z %*% u))
  logjoint <- function(u) {
    sum(dnbinom(y, size = phi, mu = mu(u), log = TRUE)) - 0.5 * sum(u^2) -
      0.5 * length(u) * log(2 * pi)
  }
  hessian <- function(u, observed) {
    m <- mu(u)
    w <- if (observed) phi * m * (phi + y) / (phi + m)^2 else phi * m / (phi + m)
    crossprod(Z, Z * w) + diag(ncol(Z))
  }
  u <- rep(0, ncol(Z))
  repeat {
    m <- mu(u)
    g <- drop(crossprod(Z, phi * (y - m) / (phi + m))) - u
    if (max(abs(g)) < 1e-10) break
    step <- solve(hessian(u, TRUE), g)
    a <- 1
    while (logjoint(u + a * step) < logjoint(u)) a <- a / 2
    u <- u + a * step
  }
  laplace <- function(observed) {
    logjoint(u) + 0.5 * length(u) * log(2 * pi) -
      0.5 * as.numeric(determinant(hessian(u, observed))$modulus)
  }
  say("  Laplace at glmmTMB's parameters, observed information: ",
      sprintf("%.15g", laplace(TRUE)), "; expected information: ",
      sprintf("%.15g", laplace(FALSE)))
  stopifnot(abs(laplace(TRUE) - as.numeric(logLik(fit_nb))) < 1e-8)
})

run_case(
  "pastes_nested", "pastes.csv",
  "strength ~ 1 + (1 | batch/cask)", "gaussian", NULL,
  "glmmTMB(strength ~ 1 + (1 | batch/cask), data = pastes, family = gaussian)",
  c(batch = "batch", "batch:cask" = "cask:batch"),
  "lmer(strength ~ 1 + (1 | batch/cask), data = pastes, REML = FALSE)"
)

# glmmTMB multiplies each observation's log-likelihood term by its weight
# (for the Gaussian family too: not lme4's precision weights, which divide
# the residual variance by w). With integer weights that is the unweighted
# likelihood of the data with row i repeated w[i] times, which lmer fits:
# the lme4 cross-check (same logLik and estimates; nobs and BIC differ).
sleep_repeated <- sleepstudy[rep(seq_len(nrow(sleepstudy)), sleepstudy$w), ]
fit_w <- run_case(
  "sleepstudy_weighted", "sleepstudy.csv",
  "Reaction ~ Days + (1 | Subject)", "gaussian", "w",
  "glmmTMB(Reaction ~ Days + (1 | Subject), data = sleepstudy, family = gaussian, weights = w)",
  c(Subject = "Subject"),
  "lmer(Reaction ~ Days + (1 | Subject), data = sleep_repeated, REML = FALSE)"
)

# The same semantics in closed form: at the fitted parameters, the weighted
# log likelihood integrated over each subject's Gaussian random intercept b,
#   sum_i w_i log N(y_i | x_i beta + b, sigma) + log N(b | 0, tau),
# is Gaussian in b, so the Laplace approximation is exact.
local({
  beta <- fixef(fit_w)$cond
  sigma <- sigma(fit_w)
  tau <- attr(VarCorr(fit_w)$cond$Subject, "stddev")[[1]]
  total <- 0
  for (s in split(sleepstudy, sleepstudy$Subject)) {
    r <- s$Reaction - beta[[1]] - beta[[2]] * s$Days
    a <- sum(s$w) / sigma^2 + 1 / tau^2
    b <- sum(s$w * r) / sigma^2
    total <- total - 0.5 * sum(s$w) * log(2 * pi * sigma^2) -
      sum(s$w * r^2) / (2 * sigma^2) - 0.5 * log(2 * pi * tau^2) +
      0.5 * log(2 * pi / a) + b^2 / (2 * a)
  }
  say("  closed form at glmmTMB's parameters: ", sprintf("%.15g", total),
      " (minus glmmTMB's logLik: ", fmt(total - as.numeric(logLik(fit_w))),
      ")")
  stopifnot(abs(total - as.numeric(logLik(fit_w))) < 1e-8)
})

# --- 4. Write the JSON ---------------------------------------------------------

out <- file.path(data_dir, "glmm_reference.json")
writeLines(toJSON(entries, auto_unbox = TRUE, digits = NA, null = "null",
                  na = "null", pretty = TRUE), out)
say("\nWrote ", length(entries), " cases to ", out)
